"""The shape of the package's imports: one way down, no circle, no private name across files.

DESIGN.md (Layout): "imports run one way, from the families down to steps, dispatch and
kernels. There is no circle, and no underscore name crosses a file." These tests read every
``.py`` file of the installed package (``sdvae/``, and ``kernels/`` as ``sdvae.kernels``, as
setup.py's ``package_dir`` maps it) without importing any of it, and check three rules:

1. **No circle.** The import graph has one node per module and one edge per import of another
   package module, at module level *and* inside functions (a function-level import is a
   dependency too; it only runs later). Any strongly connected component of more than one
   module is a circle; each edge inside one is reported.
2. **No upward import.** ``LAYERS`` below orders the modules; an import from a module to one in
   a strictly higher layer is upward. Imports within one layer are allowed (rule 1 still
   catches their circles).
3. **No underscore name across files** (dunders such as ``__version__`` are public):

   * ``from .x import _name`` (any spelling: relative, ``sdvae.``-absolute);
   * ``mod._name``, read or written, where ``mod`` resolves *statically* to a package module:
     a name bound by an import in this scope or an enclosing one (``from . import model as
     M``, ``import sdvae``), followed through submodule attributes (``sdvae.model._x``);
   * ``getattr/hasattr/setattr/delattr(mod, "_name")`` on such a module;
   * object attributes (``obj._name``, ``getattr(obj, "_name")``): which object ``obj`` is
     cannot be known from the text, so the rule goes by ownership. A file *owns* an
     underscore attribute name when it binds it on some object (``x._n = ...``,
     ``setattr(x, "_n", ...)`` with a literal or a module-level string constant, or a class
     body that defines ``_n``). A read of ``._n`` in a file that does not own ``_n``, while
     another package file does, is a crossing (e.g. ``stream`` reading
     ``part._sdvae_original_act``, which ``diffusers_patch`` sets). Names no package file
     binds (torch's ``_modules``, accelerate's ``_hf_hook``) belong to other projects and are
     not this rule's business. A name two files both bind is owned by both.

   A module whose *own* name starts with an underscore (``_ext``, ``_tf32``, ``_aot``) is
   package-internal, not file-private: importing that module inside the package is fine;
   its underscore names are not.

Third-party and standard-library imports are not nodes of the graph, so the lazy imports of
optional dependencies (diffusers, accelerate, safetensors, PIL, matplotlib) never count.
Imports by a computed name (``importlib.import_module(f"...{x}")``) cannot be read and are
skipped; ``importlib.import_module("sdvae.x")`` with a literal is read.

The layers, bottom to top (``LAYERS``), and why each module sits where it sits. The order is
DESIGN.md's target read onto today's files: families on top, importing down to the
executors, dispatch and kernels (issue 27: "the banded executor and the planner import no
model class"). Where code runs the other way, that is the debt below.

* ``kernels``: ``sdvae.kernels.*``, the Triton ops. DESIGN.md: ``sdvae`` -> ``sdvae.kernels``,
  never back; lowest, so that any import from it into the rest of the package is upward.
* ``base``: leaves that import nothing of sdvae but kernels, and that any layer may use:
  ``_ext`` (loads ``sdvae._C``), ``_tf32`` (torch's TF32 switch), ``numerics`` (the tolerance
  table), ``config`` (``VAEConfig``, ``WanConfig``, plain data), ``memtrack`` (counts tensor
  bytes), ``io`` (image and video files, ``InputError``), ``_aot`` (ahead-of-time Triton
  compiles for tests/checks), ``wan_keys`` (original Wan checkpoint key names to diffusers').
* ``ops``: ``sdvae.ops``, the C++/CUDA ops over ``_ext``.
* ``dispatch``: ``sdvae.dispatch``, the one place that picks fused kernel or eager per op
  (above the ops it picks between, below every caller), and ``sdvae.steps``, the step
  records every executor reads (with the registry the families' lowerings join).
* ``executors``: what runs a network: ``execute`` (the whole-tensor executor), ``graphs``
  (CUDA graphs of the whole-tensor path) and ``stream`` (the banded executor).
* ``planner``: ``budget`` (memory plans). It measures the executors, so it sits above them,
  and below the families that ask it for a plan.
  ``wan_stream``: the Wan family's banded executor and its measured plans (it runs the
  family's own modules, duck-typed: it imports no model class).
* ``family``: ``model``, sdvae's own family: the reference modules and their state-dict
  names; ``VAE.decode(max_memory=...)`` calls down into the planner and the executors.
  ``wan``: the Wan video family (Wan 2.1/2.2, Qwen-Image), beside it.
* ``family-ops``: what works on a built sdvae ``VAE``: ``fast`` (``optimize``, which walks
  the model's classes) and ``loading`` (checkpoints in and out, to and from diffusers).
* ``diffusers``: ``diffusers_patch``, the diffusers family. It uses ``loading``'s model
  checks and ``fast``'s op status, so it sits above them.
* ``api``: ``sdvae`` itself (``sdvae/__init__.py``), the public facade over the families.
* ``apps``: users of the public API: ``cache`` (latent caching), ``check`` (``sdvae check``),
  ``profile``, and the benchmark engine ``sdvae.bench.*`` (``profile`` uses its cases).
* ``cli``: ``sdvae.cli``, the command line over all of the above.

A new module fails ``test_every_module_sits_in_exactly_one_layer`` until it is placed here.

A ratchet, because the code does not follow these rules yet (issue 27's redesign removes the
debt): ``tests/data/layering_debt.txt`` lists today's known violations, one a line, sorted:

    circle  A -> B        an import edge inside a circle
    upward  A -> B        A imports B, which sits in a higher layer
    private A -> B._name  A imports or reads B's module-level private name
    attr    A -> B._name  A reads an underscore attribute that B's code binds on objects

(lines are keyed by module, not by line number, so edits elsewhere in a file do not move
them). Each test fails on a violation that is not listed, naming its file:line, and on a
listed line that no longer occurs, asking to delete that line: the list only shrinks.

When this test landed (HEAD 405e2c4), the list held: one circle of 6 modules (model,
budget, stream, diffusers_patch, fast, loading) held by 12 import edges (23 import
statements); 8 upward imports in 3 module pairs (stream -> diffusers_patch 5, stream ->
model 2, budget -> model 1); 25 private module names (34 places) and 5 private object
attributes (8 places) crossing files. The failure messages print the counts of the day;
``python tests/test_layering.py`` prints the full report (circles, upward imports with
file:line, crossings by module pair, what is new or stale against the list), and
``--root DIR`` (or SDVAE_LAYERING_ROOT for pytest) reads another copy of the package.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tree to check; another one (a copy with a planted violation, an old checkout) through
# SDVAE_LAYERING_ROOT, or --root on the command line.
ROOT = Path(os.environ.get("SDVAE_LAYERING_ROOT") or REPO)
DEBT = Path(__file__).resolve().parent / "data" / "layering_debt.txt"

# Where each package's files live, relative to the root (setup.py's package_dir).
SOURCES = {"sdvae": "sdvae", "sdvae.kernels": "kernels"}
# Compiled modules (setup.py's ext_modules): leaves, not nodes; known before any build.
EXTENSIONS = {"sdvae._C"}

# Bottom to top. A name ending in ".*" means that package's submodules (not the package).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("sdvae.kernels", "sdvae.kernels.*")),
    (
        "base",
        (
            "sdvae._ext",
            "sdvae._tf32",
            "sdvae.numerics",
            "sdvae.config",
            "sdvae.memtrack",
            "sdvae.io",
            "sdvae._aot",
            "sdvae.wan_keys",
        ),
    ),
    ("ops", ("sdvae.ops",)),
    ("dispatch", ("sdvae.dispatch", "sdvae.steps")),
    ("executors", ("sdvae.execute", "sdvae.graphs", "sdvae.stream")),
    ("planner", ("sdvae.budget", "sdvae.wan_stream")),
    ("family", ("sdvae.model", "sdvae.wan")),
    ("family-ops", ("sdvae.fast", "sdvae.loading")),
    ("diffusers", ("sdvae.diffusers_patch",)),
    ("api", ("sdvae",)),
    ("apps", ("sdvae.cache", "sdvae.check", "sdvae.profile", "sdvae.bench", "sdvae.bench.*")),
    ("cli", ("sdvae.cli",)),
]

KINDS = ("circle", "upward", "private", "attr")
_ACCESSORS = ("getattr", "hasattr", "setattr", "delattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    dst: str  # imported package module
    path: str  # file, relative to the root
    line: int
    scope: str  # "<module>" or the enclosing function's qualified name

    @property
    def lazy(self) -> bool:
        return self.scope != "<module>"


@dataclass(frozen=True)
class Violation:
    kind: str  # one of KINDS
    key: str  # the allowlist line
    path: str
    line: int
    detail: str

    def where(self) -> str:
        return f"{self.path}:{self.line}"


class Package:
    """The modules under ``root`` (per ``sources``) and what their files import and read."""

    def __init__(self, root: Path, sources: dict[str, str] = SOURCES):
        self.root = Path(root)
        self.tops = {p.split(".")[0] for p in sources}
        self.files: dict[str, Path] = {}  # module -> file
        self.packages: set[str] = set()  # modules that are packages (__init__.py)
        self.extensions = set(EXTENSIONS)  # compiled modules: leaves, not nodes
        for pkg, folder in sources.items():
            base = self.root / folder
            for path in sorted(base.rglob("*")):
                rel = path.relative_to(base)
                if "__pycache__" in rel.parts:
                    continue
                if path.suffix == ".py":
                    parts = [*rel.parent.parts] + ([] if rel.stem == "__init__" else [rel.stem])
                    name = ".".join([pkg, *parts])
                    self.files[name] = path
                    if rel.stem == "__init__":
                        self.packages.add(name)
                elif path.suffix in (".so", ".pyd"):
                    stem = path.name.split(".")[0]
                    self.extensions.add(".".join([pkg, *rel.parent.parts, stem]))
        self.imports: list[Import] = []
        self.crossings: list[Violation] = []  # "private" kind
        self.errors: list[str] = []  # imports that resolve to nothing
        self._attr_owners: dict[str, set[str]] = defaultdict(set)
        self._attr_reads: list[tuple[str, str, str, int, str]] = []
        for module, path in self.files.items():
            _FileScan(self, module, path).run()
        for module, name, rel, line, scope in self._attr_reads:
            owners = self._attr_owners.get(name, set())
            if owners and module not in owners:
                owner = ",".join(sorted(owners))
                self.crossings.append(
                    Violation(
                        "attr",
                        f"attr {module} -> {owner}.{name}",
                        rel,
                        line,
                        f"{scope} reads .{name}, an attribute {owner} binds on objects",
                    )
                )

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def is_module(self, name: str) -> bool:
        return name in self.files or name in self.extensions

    def graph(self) -> dict[str, set[str]]:
        g: dict[str, set[str]] = {m: set() for m in self.files}
        for imp in self.imports:
            if imp.dst in self.files and imp.dst != imp.src:
                g[imp.src].add(imp.dst)
        return g


class _FileScan:
    """One file: its imports (edges and names bound to modules), scope by scope."""

    def __init__(self, pkg: Package, module: str, path: Path):
        self.pkg, self.module, self.path = pkg, module, path
        self.rel = pkg.rel(path)
        self.here = module if module in pkg.packages else module.rpartition(".")[0]
        self.tree = ast.parse(path.read_text(), str(path))
        self._seen: set[Import] = set()
        self.constants = {  # module-level NAME = "string", for setattr(x, NAME, ...)
            t.id: node.value.value
            for node in self.tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            if isinstance(node.value.value, str)
            for t in node.targets
            if isinstance(t, ast.Name)
        }

    def run(self):
        self._scope(self.tree.body, {}, "<module>", is_class=False)

    # -- resolving names ------------------------------------------------------------------
    def _base(self, level: int, module: str | None, line: int) -> str | None:
        if level == 0:
            return module
        parts = self.here.split(".")
        if level - 1 >= len(parts):
            self.pkg.errors.append(f"{self.rel}:{line} relative import above the package")
            return None
        base = ".".join(parts[: len(parts) - (level - 1)])
        return f"{base}.{module}" if module else base

    def _ours(self, name: str | None) -> bool:
        return bool(name) and any(name == p or name.startswith(p + ".") for p in self.pkg.tops)

    def _resolve(self, node: ast.AST, env: dict[str, str]) -> str | None:
        """The package module an expression names, when the text says so."""
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value, env)
            if base and self.pkg.is_module(f"{base}.{node.attr}"):
                return f"{base}.{node.attr}"
        return None

    def _literal(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        return None

    # -- recording ------------------------------------------------------------------------
    def _edge(self, dst: str, line: int, scope: str):
        if dst in self.pkg.extensions:
            return
        if dst not in self.pkg.files:
            self.pkg.errors.append(f"{self.rel}:{line} imports {dst}, which is not a module")
            return
        imp = Import(self.module, dst, self.rel, line, scope)
        if imp not in self._seen:  # `from .m import a, b`: one edge
            self._seen.add(imp)
            self.pkg.imports.append(imp)

    def _cross(self, owner: str, name: str, line: int, scope: str, how: str):
        if owner == self.module or not _private(name):
            return
        self.pkg.crossings.append(
            Violation(
                "private",
                f"private {self.module} -> {owner}.{name}",
                self.rel,
                line,
                f"{scope} {how} {owner}.{name}",
            )
        )

    def _bind_imports(self, node: ast.AST, scope: str) -> dict[str, str]:
        """Record the edges of one import statement; return the names it binds to modules."""
        bound: dict[str, str] = {}
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not self._ours(alias.name):
                    continue
                self._edge(alias.name, line, scope)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = self._base(node.level, node.module, line)
            if not self._ours(base):
                return bound
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                local = alias.asname or alias.name
                if self.pkg.is_module(sub):  # a submodule: `from . import stream`
                    self._edge(sub, line, scope)
                    bound[local] = sub
                else:
                    self._edge(base, line, scope)
                    self._cross(base, alias.name, line, scope, "imports")
        elif isinstance(node, ast.Call):  # importlib.import_module("sdvae.x"), anywhere
            name = self._import_module(node)
            if name:
                self._edge(name, line, scope)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            name = self._import_module(node.value)  # M = importlib.import_module(...)
            if name in self.pkg.files:
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        bound[t.id] = name
        return bound

    def _import_module(self, call: ast.Call) -> str | None:
        """The package module an ``import_module("sdvae....")`` call names, if it is one."""
        func = call.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if fname != "import_module" or len(call.args) != 1 or call.keywords:
            return None
        name = self._literal(call.args[0])
        return name if self._ours(name) else None

    # -- scopes ---------------------------------------------------------------------------
    def _scope(self, body: list[ast.AST], outer: dict[str, str], scope: str, is_class: bool):
        nodes, nested = _scope_nodes(body)
        env = dict(outer)
        for node in nodes:  # an import anywhere in a function binds for all of it
            env.update(self._bind_imports(node, scope))
        for node in nodes:
            self._check(node, env, scope, is_class)
        for node in nested:
            qual = node.name if scope == "<module>" else f"{scope}.{node.name}"
            inner = outer if is_class else env  # a class body's names do not reach methods
            self._scope(node.body, inner, qual, isinstance(node, ast.ClassDef))

    def _check(self, node: ast.AST, env: dict[str, str], scope: str, is_class: bool):
        own = self.pkg._attr_owners
        if is_class:  # a class body binds the attributes it defines
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if _private(node.name):
                    own[node.name].add(self.module)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                if _private(node.id):
                    own[node.id].add(self.module)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value, env)
            if base is not None:
                if not self.pkg.is_module(f"{base}.{node.attr}"):
                    how = "reads" if isinstance(node.ctx, ast.Load) else "writes"
                    self._cross(base, node.attr, node.lineno, scope, how)
            elif _private(node.attr):
                if isinstance(node.ctx, ast.Load):
                    self.pkg._attr_reads.append(
                        (self.module, node.attr, self.rel, node.lineno, scope)
                    )
                else:
                    own[node.attr].add(self.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _ACCESSORS
            and len(node.args) >= 2
        ):
            name = self._literal(node.args[1])
            if name is None or not _private(name):
                return
            base = self._resolve(node.args[0], env)
            if base is not None:
                self._cross(base, name, node.lineno, scope, f"calls {node.func.id}() for")
            elif node.func.id == "setattr":
                own[name].add(self.module)
            elif node.func.id != "delattr":
                self.pkg._attr_reads.append((self.module, name, self.rel, node.lineno, scope))


def _scope_nodes(body: list[ast.AST]) -> tuple[list[ast.AST], list[ast.AST]]:
    """The nodes of one scope, and the function/class definitions nested in it (whose
    decorators, defaults and bases belong to this scope, their bodies to their own)."""
    nodes, nested, stack = [], [], list(reversed(body))
    while stack:
        node = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            nested.append(node)
            outside = list(node.decorator_list)
            if isinstance(node, ast.ClassDef):
                outside += node.bases + [k.value for k in node.keywords]
            else:
                outside += node.args.defaults + [d for d in node.args.kw_defaults if d]
            stack.extend(reversed(outside))
        else:
            stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return nodes, nested


# ----------------------------------------------------------------------------- the rules
def layer_of(module: str, layers=LAYERS) -> list[int]:
    """The indices of the layers whose patterns name ``module`` (exactly one, when right)."""
    hits = []
    for i, (_, patterns) in enumerate(layers):
        for p in patterns:
            if module == p or (p.endswith(".*") and module.startswith(p[:-1])):
                hits.append(i)
    return hits


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one node, each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


@dataclass
class Report:
    pkg: Package
    layers: list
    sccs: list[list[str]]
    violations: list[Violation]

    def of(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def counts(self) -> str:
        members = sum(len(c) for c in self.sccs)
        up = self.of("upward")
        return (
            f"{members} modules in {len(self.sccs)} circle(s) held by "
            f"{len({v.key for v in self.of('circle')})} edges; "
            f"{len(up)} upward imports ({len({v.key for v in up})} module pairs); "
            f"{len({v.key for v in self.of('private')})} private module names and "
            f"{len({v.key for v in self.of('attr')})} private object attributes crossing "
            f"files ({len(self.of('private')) + len(self.of('attr'))} places)"
        )


def analyze(root: Path = ROOT, sources: dict[str, str] = SOURCES, layers=LAYERS) -> Report:
    pkg = Package(root, sources)
    graph = pkg.graph()
    sccs = strongly_connected(graph)
    comp = {m: i for i, c in enumerate(sccs) for m in c}
    out: list[Violation] = []
    for imp in pkg.imports:
        if imp.dst == imp.src:
            continue
        where = "at module level" if not imp.lazy else f"in {imp.scope}"
        if imp.src in comp and comp.get(imp.dst) == comp[imp.src]:
            out.append(
                Violation(
                    "circle",
                    f"circle {imp.src} -> {imp.dst}",
                    imp.path,
                    imp.line,
                    f"imports {imp.dst} {where}, inside a circle of "
                    f"{len(sccs[comp[imp.src]])} modules",
                )
            )
        a, b = layer_of(imp.src, layers), layer_of(imp.dst, layers)
        if len(a) == 1 and len(b) == 1 and b[0] > a[0]:
            out.append(
                Violation(
                    "upward",
                    f"upward {imp.src} -> {imp.dst}",
                    imp.path,
                    imp.line,
                    f"imports {imp.dst} {where}: layer {layers[a[0]][0]!r} up to "
                    f"{layers[b[0]][0]!r}",
                )
            )
    out += pkg.crossings
    out.sort(key=lambda v: (v.kind, v.key, v.path, v.line))
    return Report(pkg, layers, sccs, out)


def read_debt(path: Path = DEBT) -> list[str]:
    if not path.exists():
        return []
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [" ".join(ln.split()) for ln in lines if ln]


def ratchet(report: Report, debt: list[str], kinds=KINDS) -> tuple[list[Violation], list[str]]:
    """(violations not in the list, listed lines that no longer occur), for ``kinds``."""
    found = [v for v in report.violations if v.kind in kinds]
    allowed = {ln for ln in debt if ln.split(" ", 1)[0] in kinds}
    keys = {v.key for v in found}
    return [v for v in found if v.key not in allowed], sorted(allowed - keys)


def ratchet_message(report: Report, new: list[Violation], stale: list[str], what: str) -> str:
    msg = [f"{what} (today: {report.counts()})"]
    if any(v.kind == "circle" for v in new):
        msg += [f"circle now: {' '.join(c)}" for c in report.sccs]
    if new:
        msg.append(f"{len(new)} new, not in {_shown(DEBT)}:")
        msg += [f"  {v.where()}: {v.detail}" for v in new]
        msg.append("Fix them (DESIGN.md, Layout). Only a deliberate exception is listed there:")
        msg += [f"  {k}" for k in sorted({v.key for v in new})]
    if stale:
        msg.append(f"Gone from the code, still listed: delete these lines of {_shown(DEBT)}:")
        msg += [f"  {k}" for k in stale]
    return "\n".join(msg)


def _shown(path: Path) -> str:
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def report() -> Report:
    return analyze()


def test_every_module_sits_in_exactly_one_layer(report):
    wrong = {m: [report.layers[i][0] for i in layer_of(m)] for m in report.pkg.files}
    wrong = {m: names for m, names in wrong.items() if len(names) != 1}
    assert not wrong, (
        "each module of the package must sit in exactly one of LAYERS (tests/test_layering.py"
        f"); place it and say why in the docstring: {wrong}"
    )


def test_every_import_resolves(report):
    assert not report.pkg.errors, "\n".join(report.pkg.errors)


def test_debt_list_is_sorted_and_unique():
    debt = read_debt()
    assert debt == sorted(set(debt)), f"keep {_shown(DEBT)} sorted, one line each"
    bad = [ln for ln in debt if ln.split(" ", 1)[0] not in KINDS or " -> " not in ln]
    assert not bad, f"lines of {_shown(DEBT)} that are not `<kind> A -> B`: {bad}"


@pytest.mark.parametrize(
    "kinds, what",
    [
        (("circle",), "import circles"),
        (("upward",), "upward imports"),
        (("private", "attr"), "underscore names crossing files"),
    ],
    ids=["no-new-circle", "no-new-upward-import", "no-new-underscore-crossing"],
)
def test_ratchet(report, kinds, what):
    new, stale = ratchet(report, read_debt(), kinds)
    assert not new and not stale, ratchet_message(report, new, stale, what)


def kernels_escapes(report: Report) -> list[str]:
    """What ``sdvae.kernels`` imports from the rest of the package (file:line each)."""
    inside = lambda m: m == "sdvae.kernels" or m.startswith("sdvae.kernels.")
    bad = [
        f"{i.path}:{i.line} imports {i.dst}"
        for i in report.pkg.imports
        if inside(i.src) and not inside(i.dst)
    ]
    kernel_files = {report.pkg.rel(f) for m, f in report.pkg.files.items() if inside(m)}
    return bad + [e for e in report.pkg.errors if e.split(":", 1)[0] in kernel_files]


def test_kernels_import_nothing_from_the_rest_of_sdvae(report):
    """DESIGN.md: sdvae -> sdvae.kernels, never back. Stronger than the check in
    test_vae_sample.py: it also sees ``importlib.import_module("sdvae...")`` and relative
    imports that resolve outside kernels/, and the layer test keeps kernels/ at the bottom."""
    bad = kernels_escapes(report)
    assert not bad, "kernels/ imports the package above it:\n" + "\n".join(bad)


# -- the checker itself, on a package made up for the purpose
MADE_UP = {
    "pkg/__init__.py": "from .top import run\n",
    "pkg/low.py": "_CACHE = {}\n\n\ndef f():\n    from . import top\n\n    return top\n",
    "pkg/top.py": (
        "import importlib\n"  # 1
        "\n"
        "import sdvae.low\n"  # 3
        "from . import low as L\n"  # 4
        "from .low import _CACHE\n"  # 5
        "\n"
        "\n"
        "class Thing:\n"
        "    def _hidden(self):\n"  # 9: class bodies own their underscore names
        "        return 1\n"
        "\n"
        "\n"
        "def run(x):\n"
        "    x._mark = 1\n"  # 14: so does an attribute store
        "    return sdvae.low._CACHE, getattr(L, '_CACHE'), L.__name__, _CACHE\n"  # 15
    ),
    "pkg/reader.py": (
        "def g(obj):\n"
        "    return obj._mark, obj._hidden(), obj._not_ours, getattr(obj, '_mark')\n"  # 2
    ),
    "ker/__init__.py": "",
    "ker/k.py": "import importlib\n\n\ndef h():\n    return importlib.import_module('sdvae.top')\n",
}
MADE_UP_LAYERS = [
    ("bottom", ("sdvae.kernels", "sdvae.kernels.*", "sdvae.low")),
    ("top", ("sdvae", "sdvae.top", "sdvae.reader")),
]


@pytest.fixture
def made_up(tmp_path) -> Report:
    for rel, text in MADE_UP.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return analyze(tmp_path, {"sdvae": "pkg", "sdvae.kernels": "ker"}, MADE_UP_LAYERS)


def test_the_checker_finds_each_kind(made_up):
    got = sorted((v.key, v.where()) for v in made_up.violations)
    assert made_up.sccs == [["sdvae.low", "sdvae.top"]]
    assert got == [
        ("attr sdvae.reader -> sdvae.top._hidden", "pkg/reader.py:2"),
        ("attr sdvae.reader -> sdvae.top._mark", "pkg/reader.py:2"),
        ("attr sdvae.reader -> sdvae.top._mark", "pkg/reader.py:2"),
        ("circle sdvae.low -> sdvae.top", "pkg/low.py:5"),  # a function-level import counts
        ("circle sdvae.top -> sdvae.low", "pkg/top.py:3"),
        ("circle sdvae.top -> sdvae.low", "pkg/top.py:4"),
        ("circle sdvae.top -> sdvae.low", "pkg/top.py:5"),
        ("private sdvae.top -> sdvae.low._CACHE", "pkg/top.py:15"),  # sdvae.low._CACHE
        ("private sdvae.top -> sdvae.low._CACHE", "pkg/top.py:15"),  # getattr(L, "_CACHE")
        ("private sdvae.top -> sdvae.low._CACHE", "pkg/top.py:5"),
        ("upward sdvae.kernels.k -> sdvae.top", "ker/k.py:5"),  # import_module("sdvae.top")
        ("upward sdvae.low -> sdvae.top", "pkg/low.py:5"),
    ]
    assert kernels_escapes(made_up) == ["ker/k.py:5 imports sdvae.top"]


def test_the_ratchet_names_new_places_and_stale_lines(made_up):
    debt = [
        "circle sdvae.low -> sdvae.top",
        "circle sdvae.top -> sdvae.low",
        "upward sdvae.x -> sdvae.y",
    ]
    new, stale = ratchet(made_up, debt, ("circle", "upward"))
    assert stale == ["upward sdvae.x -> sdvae.y"]
    assert [v.where() for v in new] == ["ker/k.py:5", "pkg/low.py:5"]
    msg = ratchet_message(made_up, new, stale, "upward imports")
    assert "ker/k.py:5: imports sdvae.top in h: layer 'bottom' up to 'top'" in msg
    assert "delete these lines" in msg and "  upward sdvae.x -> sdvae.y" in msg
    assert "2 modules in 1 circle(s)" in msg  # today's counts ride along


# ----------------------------------------------------------------------------- the report
def print_report(r: Report, debt_path: Path = DEBT, out=sys.stdout) -> int:
    p = lambda *a: print(*a, file=out)
    p(
        f"sdvae import graph at {r.pkg.root}: {len(r.pkg.files)} modules, "
        f"{len(r.pkg.imports)} imports of package modules"
    )
    p(f"today: {r.counts()}\n")
    p("layers, bottom to top:")
    for i, (name, _) in enumerate(r.layers):
        mods = sorted(m for m in r.pkg.files if layer_of(m, r.layers) == [i])
        p(f"  {i:2d} {name:<11} {' '.join(mods) or '(no module yet)'}")
    unplaced = sorted(m for m in r.pkg.files if len(layer_of(m, r.layers)) != 1)
    if unplaced:
        p(f"  not in exactly one layer: {' '.join(unplaced)}")
    p("\ncircles (strongly connected components):")
    for c in r.sccs:
        p(f"  {len(c)} modules: {' '.join(c)}")
    sections = [
        ("circle", "edges inside a circle"),
        ("upward", "upward imports"),
        ("private", "private module names crossing files"),
        ("attr", "private object attributes crossing files"),
    ]
    for kind, title in sections:
        vs = r.of(kind)
        p(f"\n{title}: {len({v.key for v in vs})} ({len(vs)} places)")
        by_key = defaultdict(list)
        for v in vs:
            by_key[v.key].append(v)
        for key, group in sorted(by_key.items()):
            p(f"  {key.split(' ', 1)[1]}")
            for v in group:
                p(f"      {v.where()}: {v.detail}")
    pairs = defaultdict(int)
    for v in r.of("private") + r.of("attr"):
        src, dst = v.key.split(" ", 1)[1].split(" -> ")
        pairs[(src, dst.rpartition(".")[0])] += 1
    p("\nunderscore crossings by module pair (places):")
    for (a, b), n in sorted(pairs.items()):
        p(f"  {n:3d}  {a} -> {b}")
    for e in r.pkg.errors:
        p(f"unresolved: {e}")
    new, stale = ratchet(r, read_debt(debt_path))
    p(f"\nagainst {_shown(debt_path)}: {len(new)} new, {len(stale)} stale")
    for v in new:
        p(f"  NEW   {v.where()}: {v.key}")
    for k in stale:
        p(f"  STALE {k}")
    return 1 if new or stale or r.pkg.errors else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--root", type=Path, default=ROOT, help="the folder holding sdvae/ and kernels/"
    )
    ap.add_argument("--debt", type=Path, default=DEBT, help="the allowlist to compare against")
    ap.add_argument(
        "--write-debt",
        action="store_true",
        help="print today's violations as allowlist lines (to review, not to paste blindly)",
    )
    args = ap.parse_args(argv)
    r = analyze(args.root)
    if args.write_debt:
        print("\n".join(sorted({v.key for v in r.violations})))
        return 0
    return print_report(r, args.debt)


if __name__ == "__main__":
    sys.exit(main())
