"""Op trace of sdvae's fused path: what the GPU path issues, recorded on the CPU.

The trace is the guard of the structural redesign (issue 27, "Guard the GPU path while
changing it"): ``tests/test_optrace.py`` rebuilds each case below, records it with the current
code and compares it, entry by entry, with the file committed under ``tests/data/optrace/``.
The GPU's speed cannot be measured without a GPU; an unchanged trace (same ops, same order,
same shapes, dtypes and memory formats, no extra copies, the same in-place writes) is how we
know the GPU path did not move.

What is recorded, in order (``record()``, a context manager that yields the list of entries):

* ``op``: every dispatcher op, through a ``TorchDispatchMode``: ATen ops and the ops sdvae
  registers (``sdvae::conv2d``, ``sdvae::pad_conv2d``, ``sdvae::attention``). The ops an op
  runs inside itself (the CPU kernel of ``sdvae::conv2d``, the Python body of
  ``sdvae::attention``) are not seen: the mode is off inside its own handler.
* ``call``: each call of one of sdvae's own entry points (``ENTRY_POINTS``:
  ``sdvae.kernels.group_norm`` / ``attention`` / ``vae_sample`` / the GroupNorm band ops and
  their references, ``sdvae.ops.conv2d`` / ``pad_conv2d`` and theirs). GroupNorm and the
  sampling step are plain Python launchers today, not dispatcher ops: this is where they show.
  They are hooked by replacing the function, while recording, on every loaded ``sdvae.*``
  module that holds it (found by identity, under any name): ``sdvae.kernels``, the defining
  module such as ``sdvae.kernels.group_norm``, ``sdvae.ops``, and any module that bound it at
  import time with ``from ... import``. The model reads them as ``kernels.group_norm(...)`` /
  ``ops.conv2d(...)`` attribute lookups, or imports them inside a function from the defining
  module, so every call goes through a hook. ``hooked_bindings()`` (``--hooks``) lists them.
* ``launch``: each Triton kernel launch (``kernel[grid](...)``), hooked at the launcher class
  (the interpreter's ``InterpretedFunction.run``, and ``JITFunction.run``): kernel, grid, the
  tensor arguments, the other arguments' values and the constexprs. The ATen ops the
  interpreter makes while it runs a kernel (its copies of every argument: ``empty``, ``set_``,
  ``new_empty``, ``copy_``; about 1,500 of the ~1,590 ops of a tiny decode) are not the model's
  work and are left out; so is anything else called inside a launch.

Each entry's ``depth`` is the number of entry points (``call``) it runs inside. Tensors are
written ``t<id>:<dtype>[<shape>]<format>``: ``id`` numbers storages in order of first
appearance (a view or an in-place result has its input's id, a new buffer a new one; every
tensor seen is kept alive while recording, so an address is never reused for another id),
the format is ``:nchw`` (contiguous), ``:cl`` (channels_last), or ``:s(<strides>)`` for any
other layout, with ``+<offset>`` when the view starts inside its storage. An op's ``writes``
names the arguments its schema marks as written (in-place and ``out=`` variants). No value of
any tensor is recorded: inputs only need a fixed seed.

Cases (``CASES``): encode (sampling with a fixed seed) and decode of the SD config
(``VAEConfig.tiny()``) and the FLUX.2 config (the tiny one of tests/test_flux2.py), each in
fp32 NCHW and fp16 channels_last (``sdvae.optimize(vae, channels_last=True)``, what
``optimize`` does on CUDA; inputs given in NCHW, as a pipeline gives them, so the one copy
into channels_last is part of the trace), and ``sdvae.patch_diffusers`` on a diffusers
``AutoencoderKL`` of the tiny SD config in the same two flavours; and the fused ``WanVAE``
of the tiny Wan 2.1 and Wan 2.2 configs (a 9-frame video encoded, 3 latent frames decoded:
the first, a middle and the last chunk), in fp32 NCDHW and fp16 channels_last_3d. There the
CPU's conv3d returns NCDHW where cuDNN keeps channels_last_3d, so ``sdvae.dispatch.conv3d``
copies its output back (a ``call`` entry with the copy inside it, not made on the GPU) and
the rest of the trace is the GPU's layout; the conv biases follow the GPU's rule too (each
residual block's first conv without it, the second norm adding it in its loads). The fused
ops all run on the CPU: the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, fp16
included), the convs in sdvae._C's CPU kernels. Each case builds a fresh model, so
first-call work (the upsampler folds made by ``optimize``, FLUX.2's folded normalization) is
in every trace the same way; the trace holds two calls, the first and a repeat (``=== call
2`` between them), so that what is cached after the first call is checked too.

Re-record deliberately (after a change whose trace difference is intended and listed in the
closing note), from the repository root::

    TRITON_INTERPRET=1 .venv/bin/python tests/optrace.py --record            # every case
    TRITON_INTERPRET=1 .venv/bin/python tests/optrace.py --record sd_fp32_nchw_decode
    TRITON_INTERPRET=1 .venv/bin/python tests/optrace.py --show sd_fp32_nchw_decode

The files hold the torch / triton / diffusers versions they were recorded with; the test
skips a case recorded with another torch (or, for the diffusers cases, diffusers) release,
since ATen's decompositions differ between releases.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # the test run sets this in conftest.py before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data" / "optrace"
FORMAT_VERSION = 1

#: sdvae's own entry points: module -> public functions recorded as ``call`` entries.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "sdvae.kernels.group_norm": ("group_norm", "group_norm_reference"),
    "sdvae.kernels.attention": ("attention", "attention_chunked", "attention_reference"),
    "sdvae.kernels.vae_sample": ("vae_sample", "vae_sample_reference"),
    "sdvae.kernels.group_norm_band": (
        "group_norm_band_stats",
        "group_norm_band_stats_reference",
        "group_norm_band_apply",
        "group_norm_band_apply_reference",
        "merge_stats",
    ),
    "sdvae.ops": ("conv2d", "pad_conv2d", "conv2d_reference", "pad_conv2d_reference"),
    "sdvae.kernels.rms_norm": ("rms_norm", "rms_norm_reference"),
    # F.conv3d kept channels_last_3d: on the CPU a copy inside the call, which cuDNN does not
    # make (it returns channels_last_3d itself)
    "sdvae.dispatch": ("conv3d",),
}

#: Modules imported before recording: an import inside a recorded call (the model imports
#: several lazily) would otherwise put its module-level tensor work into the first case only.
PRELOAD = (
    "sdvae",
    "sdvae.model",
    "sdvae.fast",
    "sdvae.ops",
    "sdvae.graphs",
    "sdvae.stream",
    "sdvae.budget",
    "sdvae.memtrack",
    "sdvae.diffusers_patch",
    "sdvae.loading",
    "sdvae.kernels",
    "sdvae.kernels.group_norm",
    "sdvae.kernels.attention",
    "sdvae.kernels.vae_sample",
    "sdvae.kernels.group_norm_band",
    "sdvae.kernels.rms_norm",
    "sdvae.wan",
    "sdvae.wan_stream",
)


# ----------------------------------------------------------------------------- describing
class _Ids:
    """Storage ids in order of first appearance; holds every tensor it has seen, so that no
    address is freed and reused for another storage while recording."""

    def __init__(self):
        self.ids: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []

    def of(self, t: torch.Tensor) -> str:
        if t.device.type == "meta":
            return "meta"
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:  # an empty storage has no address
            return "empty"
        if ptr not in self.ids:
            self.ids[ptr] = len(self.ids)
        self.keep.append(t)
        return f"t{self.ids[ptr]}"


_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "b8",
    torch.uint8: "u8",
}


def memory_format(t: torch.Tensor) -> str:
    """``nchw`` (contiguous), ``cl`` (channels_last, not also contiguous) or ``s(strides)``,
    plus ``+offset`` when the tensor starts inside its storage."""
    if t.is_contiguous():
        fmt = "nchw"
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        fmt = "cl"
    else:
        fmt = "s(" + ",".join(str(s) for s in t.stride()) + ")"
    off = t.storage_offset()
    return fmt if not off else f"{fmt}+{off}"


def _value(v, ids: _Ids):
    """A JSON-able description of an argument or result: tensors by id, dtype, shape and
    format (never their values); scalars, dtypes and the like by value."""
    if isinstance(v, torch.Tensor):
        dt = _DTYPES.get(v.dtype, str(v.dtype).replace("torch.", ""))
        shape = ",".join(str(int(s)) for s in v.shape)
        return f"{ids.of(v)}:{dt}[{shape}]:{memory_format(v)}"
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return repr(v)  # exact and stable (JSON floats may be reformatted)
    if isinstance(v, (list, tuple)):
        return [_value(u, ids) for u in v]
    if isinstance(v, dict):
        return {str(k): _value(v[k], ids) for k in sorted(v, key=str)}
    if isinstance(v, (torch.dtype, torch.memory_format, torch.layout)):
        return str(v)
    if isinstance(v, torch.device):
        return f"device:{v.type}"  # no index: cpu here, cuda:N on a GPU
    if isinstance(v, torch.Generator):
        return "generator"
    return f"<{type(v).__name__}>"


# ------------------------------------------------------------------------------ recording
@dataclass
class _State:
    entries: list
    ids: _Ids
    depth: int = 0  # entry points we are inside
    launching: int = 0  # Triton launches we are inside: record nothing there


_ACTIVE: list[_State] = []


def _current() -> _State | None:
    return _ACTIVE[-1] if _ACTIVE else None


class _OpMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = _current()
        if st is None or st.launching:
            return func(*args, **kwargs)
        schema = func._schema
        writes = [
            a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
        ]
        entry = {
            "kind": "op",
            "name": f"{schema.name}" + (f".{schema.overload_name}" if schema.overload_name else ""),
            "depth": st.depth,
            "args": _value(list(args), st.ids),
        }
        if kwargs:
            entry["kwargs"] = _value(dict(kwargs), st.ids)
        if writes:
            entry["writes"] = writes
        st.entries.append(entry)
        out = func(*args, **kwargs)
        entry["out"] = _value(out, st.ids)
        return out


def _hook_entry(qualname: str, fn: Callable) -> Callable:
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def hooked(*args, **kwargs):
        st = _current()
        if st is None or st.launching:
            return fn(*args, **kwargs)
        try:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            described = {k: bound.arguments[k] for k in bound.arguments}
        except TypeError:  # a bad call: the function raises it itself
            described = {"args": list(args), **kwargs}
        entry = {
            "kind": "call",
            "name": qualname,
            "depth": st.depth,
            "args": _value(described, st.ids),
        }
        st.entries.append(entry)
        st.depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            st.depth -= 1
        entry["out"] = _value(out, st.ids)
        return out

    hooked.__optrace_original__ = fn
    return hooked


def _hook_launch(run: Callable) -> Callable:
    @functools.wraps(run)
    def hooked(self, *args, grid, warmup, **kwargs):
        st = _current()
        if st is None or st.launching or warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        fn = getattr(self, "fn", None)
        name = getattr(fn, "__qualname__", None) or getattr(self, "__name__", "?")
        module = (getattr(fn, "__module__", None) or "?").rsplit(".", 1)[-1]
        arg_names = list(getattr(self, "arg_names", []))
        positional = dict(zip(arg_names, args))
        if len(args) > len(arg_names):
            positional["*"] = list(args[len(arg_names) :])
        g = grid(kwargs) if callable(grid) else grid
        entry = {
            "kind": "launch",
            "name": f"{module}.{name}",
            "depth": st.depth,
            "grid": _value(list(g), st.ids),
            "args": _value(positional, st.ids),
            "constexprs": _value(kwargs, st.ids),
        }
        st.entries.append(entry)
        st.launching += 1
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            st.launching -= 1

    hooked.__optrace_original__ = run
    return hooked


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


def _install_hooks() -> tuple[list, list[str]]:
    """Hook every entry point wherever it is bound under its name in a loaded ``sdvae``
    module, and the Triton launchers; returns (undo list, the bindings hooked)."""
    preload()
    undo: list = []
    where: list[str] = []
    originals: dict[int, tuple[str, Callable]] = {}
    for modname, names in ENTRY_POINTS.items():
        mod = sys.modules[modname]
        for n in names:
            fn = getattr(mod, n)
            fn = getattr(fn, "__optrace_original__", fn)
            originals[id(fn)] = (f"{modname}.{n}", fn)
    hooks = {key: _hook_entry(q, fn) for key, (q, fn) in originals.items()}
    for modname in sorted(m for m in sys.modules if m == "sdvae" or m.startswith("sdvae.")):
        mod = sys.modules[modname]
        if mod is None:
            continue
        for attr, val in sorted(vars(mod).items()):
            if callable(val) and id(val) in hooks:
                undo.append((mod, attr, val))
                setattr(mod, attr, hooks[id(val)])
                where.append(f"{modname}.{attr}")
    launchers = []
    try:
        from triton.runtime.interpreter import InterpretedFunction

        launchers.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a triton without the interpreter
        pass
    try:
        from triton.runtime.jit import JITFunction

        launchers.append(JITFunction)
    except ImportError:  # pragma: no cover
        pass
    for cls in launchers:
        run = vars(cls).get("run")
        if run is not None:
            undo.append((cls, "run", run))
            cls.run = _hook_launch(run)
            where.append(f"{cls.__module__}.{cls.__qualname__}.run")
    return undo, where


def hooked_bindings() -> list[str]:
    """Where ``record`` puts its hooks (installs them and takes them off again)."""
    undo, where = _install_hooks()
    _uninstall(undo)
    return where


def _uninstall(undo: list) -> None:
    for obj, attr, val in reversed(undo):
        setattr(obj, attr, val)


@contextlib.contextmanager
def record():
    """Record the ops, entry-point calls and kernel launches made inside the block; yields
    the list of entries (filled as the block runs)."""
    if _ACTIVE:
        raise RuntimeError("optrace.record() does not nest")
    st = _State(entries=[], ids=_Ids())
    undo, _ = _install_hooks()
    _ACTIVE.append(st)
    try:
        with _OpMode():
            yield st.entries
    finally:
        _ACTIVE.pop()
        _uninstall(undo)
        st.ids.keep.clear()


def mark(entries: list, text: str) -> None:
    """A separator entry (e.g. between two calls of the same case)."""
    entries.append({"kind": "mark", "name": text})


# ---------------------------------------------------------------------------- the cases
SD_TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
FLUX2_TINY = dict(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4
)
IMAGE_HW = (16, 16)
#: the Wan 2.2 tiny config of tests/conftest.py's WAN_TINY (residual, 2x2 patches)
WAN22_TINY = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                  decoder_base_dim=12, z_dim=6)  # fmt: skip
#: frames of the Wan cases' videos (three chunks: the first, a middle one, the last)
WAN_FRAMES = 9
SEED = 1234


@dataclass(frozen=True)
class Case:
    family: str  # "sd", "flux2", "diffusers_sd", "wan21", "wan22"
    flavour: str  # "fp32_nchw" or "fp16_cl"
    op: str  # "encode" or "decode"

    @property
    def name(self) -> str:
        return f"{self.family}_{self.flavour}_{self.op}"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.flavour == "fp16_cl" else torch.float32

    @property
    def channels_last(self) -> bool:
        return self.flavour == "fp16_cl"


CASES = {
    c.name: c
    for c in (
        Case(family, flavour, op)
        for family in ("sd", "flux2", "diffusers_sd", "wan21", "wan22")
        for flavour in ("fp32_nchw", "fp16_cl")
        for op in ("encode", "decode")
    )
}


def _config(family: str):
    from sdvae import VAEConfig
    from sdvae.config import WanConfig

    if family == "wan21":
        return WanConfig.tiny()
    if family == "wan22":
        return WanConfig.tiny(**WAN22_TINY)
    if family == "flux2":
        return VAEConfig.flux2(**FLUX2_TINY)
    return VAEConfig.tiny(**SD_TINY)


def build(case: Case) -> tuple[Callable[[], torch.Tensor], dict]:
    """A fresh fused model for ``case`` and the call to record (one encode or decode, with
    its deterministic input); plus facts about the model for the file's header."""
    import sdvae

    torch.manual_seed(0)
    cfg = _config(case.family)
    hw = IMAGE_HW
    if case.family == "diffusers_sd":
        import diffusers
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # not the "cast with from_pretrained" advice for .to(fp16)
        try:
            akl = diffusers.AutoencoderKL(**cfg.to_diffusers()).eval().to(case.dtype)
        finally:
            dlog.set_verbosity(level)
        sdvae.patch_diffusers(akl, channels_last=case.channels_last)
        facts = {"sdvae_reasons": akl._sdvae_reasons, "patched": len(akl._sdvae_patched)}
        if case.op == "encode":
            x = torch.rand(1, 3, *hw).mul(2).sub(1).to(case.dtype)

            def call():
                gen = torch.Generator().manual_seed(SEED)
                return akl.encode(x).latent_dist.sample(gen)

        else:
            f = cfg.downsample_factor
            z = torch.randn(1, cfg.latent_channels, hw[0] // f, hw[1] // f).to(case.dtype)

            def call():
                return akl.decode(z).sample

        return call, facts
    if case.family.startswith("wan"):
        return _build_wan(case, cfg, hw)
    vae = sdvae.VAE(cfg).eval().to(case.dtype)
    sdvae.optimize(vae, channels_last=case.channels_last)
    facts = {
        "fused_reasons": vae.fused_reasons,
        "memory_format": str(vae.memory_format),
        "fused_sampling": vae.fused_sampling,
    }
    if case.op == "encode":
        x = torch.rand(1, 3, *hw).mul(2).sub(1).to(case.dtype)

        def call():
            return vae.encode(x, seed=SEED)

    else:
        z = torch.randn(1, *vae.latent_shape(*hw)).to(case.dtype)

        def call():
            return vae.decode(z)

    return call, facts


def _build_wan(case: Case, cfg, hw) -> tuple[Callable[[], torch.Tensor], dict]:
    """A fused ``WanVAE``: an encode of a 9-frame video (three chunks), a decode of three
    latent frames, its input given contiguous (NCDHW) as a pipeline gives it."""
    import sdvae
    from sdvae.wan import WanVAE

    vae = WanVAE(cfg).eval().to(case.dtype)
    sdvae.optimize(vae, channels_last=case.channels_last)
    facts = {"fused_reasons": vae.fused_reasons, "memory_format": str(vae.memory_format)}
    if case.op == "encode":
        x = torch.rand(1, cfg.image_channels, WAN_FRAMES, *hw).mul(2).sub(1).to(case.dtype)

        def call():
            return vae.encode(x)

    else:
        f = cfg.spatial_factor
        t = 1 + (WAN_FRAMES - 1) // cfg.temporal_factor
        z = torch.randn(1, cfg.z_dim, t, hw[0] // f, hw[1] // f).to(case.dtype)

        def call():
            return vae.decode(z)

    return _with_gpu_bias_rule(call), facts


def _with_gpu_bias_rule(fn):
    """``fn`` with the GPU's rule for a fused conv3d's bias (``sdvae.wan._bias_apart``: ATen
    adds it in a pass of its own on CUDA, so each residual block's second norm takes its first
    conv's bias in its loads; on the CPU oneDNN adds it inside the conv)."""
    from sdvae import wan as W

    def call():
        real, W._bias_apart = W._bias_apart, lambda t: True
        try:
            return fn()
        finally:
            W._bias_apart = real

    return call


def trace_case(case: Case | str, calls: int = 2) -> tuple[list, dict]:
    """(entries, facts): ``calls`` recorded calls of the case on a fresh model, under
    ``torch.no_grad()`` as a pipeline runs the VAE."""
    if isinstance(case, str):
        case = CASES[case]
    preload()
    call, facts = build(case)
    with torch.no_grad(), record() as entries:
        for i in range(calls):
            if i:
                mark(entries, f"=== call {i + 1}")
            call()
    return entries, facts


# ------------------------------------------------------------------------ files and diffs
def versions() -> dict:
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        out["diffusers"] = None
    return out


def path_of(name: str) -> Path:
    return DATA_DIR / f"{name}.json"


def dumps(name: str, entries: list, facts: dict) -> str:
    """The file's text: a header, then one entry per line (diffs stay readable)."""
    head = {
        "format": FORMAT_VERSION,
        "case": name,
        "versions": versions(),
        "facts": facts,
        "counts": dict(sorted(Counter(e["name"] for e in entries).items())),
    }
    lines = [json.dumps(e, sort_keys=True, separators=(",", ":")) for e in entries]
    body = ",\n".join(lines)
    text = json.dumps(head, sort_keys=True, indent=1)[:-2]  # reopen the header object
    return f'{text},\n "entries": [\n{body}\n]\n}}\n'


def save(name: str, entries: list, facts: dict) -> Path:
    p = path_of(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(name, entries, facts))
    return p


def load(name: str) -> dict:
    return json.loads(path_of(name).read_text())


def normalize(entries: list) -> list:
    """Entries as they compare: through JSON and back (tuples become lists)."""
    return json.loads(json.dumps(entries, sort_keys=True))


def render(e: dict) -> str:
    """One line per entry."""
    if e["kind"] == "mark":
        return e["name"]
    pad = "  " * e.get("depth", 0)
    parts = [f"{pad}{e['kind']} {e['name']}"]
    if "grid" in e:
        parts.append(f"grid={e['grid']}")
    parts.append(f"args={json.dumps(e.get('args'), sort_keys=True)}")
    for k in ("kwargs", "constexprs", "writes", "out"):
        if k in e:
            parts.append(f"{k}={json.dumps(e[k], sort_keys=True)}")
    return " ".join(parts)


def diff(expected: list, got: list, context: int = 4) -> str | None:
    """None when equal; else where they first differ, with ``context`` entries around it on
    both sides, and the op counts that differ."""
    expected, got = normalize(expected), normalize(got)
    if expected == got:
        return None
    i = next(
        (k for k, (a, b) in enumerate(zip(expected, got)) if a != b),
        min(len(expected), len(got)),
    )
    lo = max(0, i - context)
    out = [
        f"traces differ at entry {i} (recorded {len(expected)} entries, now {len(got)})",
        f"--- recorded [{lo}:{i + context + 1}]",
    ]
    for k in range(lo, min(len(expected), i + context + 1)):
        out.append(f"{'>' if k == i else ' '} {k:5d} {render(expected[k])}")
    out.append(f"+++ now [{lo}:{i + context + 1}]")
    for k in range(lo, min(len(got), i + context + 1)):
        out.append(f"{'>' if k == i else ' '} {k:5d} {render(got[k])}")
    if i < len(expected) and i < len(got):
        a, b = expected[i], got[i]
        fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        out.append(f"fields that differ at {i}: {', '.join(fields)}")
    ca, cb = Counter(e["name"] for e in expected), Counter(e["name"] for e in got)
    counts = [f"  {n}: {ca[n]} -> {cb[n]}" for n in sorted(set(ca) | set(cb)) if ca[n] != cb[n]]
    if counts:
        out.append("entries per name that differ (recorded -> now):")
        out.extend(counts)
    return "\n".join(out)


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help=f"case names (default: all): {', '.join(CASES)}")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", action="store_true", help="record and write the files")
    what.add_argument("--check", action="store_true", help="record and compare with the files")
    what.add_argument("--show", action="store_true", help="record and print the trace")
    what.add_argument("--hooks", action="store_true", help="print where hooks go")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("run with TRITON_INTERPRET=1 (the traces are recorded in the interpreter)")
    if args.hooks:
        print("\n".join(hooked_bindings()))
        return 0
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {list(CASES)}")
    bad = 0
    for name in names:
        entries, facts = trace_case(name)
        if args.record:
            print(f"{name}: {len(entries)} entries -> {save(name, entries, facts)}")
        elif args.show:
            print(f"# {name}: {len(entries)} entries")
            for k, e in enumerate(entries):
                print(f"{k:5d} {render(e)}")
        else:
            d = diff(load(name)["entries"], entries)
            print(f"{name}: {'ok' if d is None else 'DIFFERS'} ({len(entries)} entries)")
            if d is not None:
                print(d)
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
