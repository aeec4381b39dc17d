"""Ahead-of-time compilation of Triton kernels for GPUs that are not present.

``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` needs no GPU, but it needs the real
``@triton.jit`` functions, which ``TRITON_INTERPRET=1`` replaces; so the compile runs in a
fresh interpreter without that variable (``python -m sdvae._aot``), one process per call,
every configuration of the call in it.

Each result also says what ptxas made of the kernel: registers per thread, the stack frame,
and the bytes of register spill stores and loads (``ptxas -v``'s own figures: local arrays,
such as the slow path of ``sin``/``cos``, take stack but are not spills). Triton runs
``ptxas -v`` on every compile but keeps the log only on failure, so the worker keeps a copy
(``subprocess.run`` wrapped, in this worker process only) and stores the figures beside the
kernel in Triton's cache; a kernel found in the cache without them is compiled once more.
The figures are those of the ptxas the installed Triton uses for that target.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys

#: Opt-in shared memory per block, bytes (A100: 163 KiB; H100/H200: 227 KiB).
SHARED_LIMIT = {80: 166912, 90: 232448}
TARGETS = (80, 90)


_USAGE_FILE = "sdvae_ptxas_usage.json"
_PTXAS_LOGS: list[str] = []


def _keep_ptxas_logs() -> None:
    """Make ``subprocess.run`` keep the ``ptxas -v`` log Triton sends to a temporary file."""
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        result = real_run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        is_ptxas = isinstance(cmd, (list, tuple)) and "ptxas" in os.path.basename(str(cmd[0]))
        if is_ptxas and "-v" in cmd and hasattr(err, "name"):
            with open(err.name) as f:
                _PTXAS_LOGS.append(f.read())
        return result

    subprocess.run = run


def parse_ptxas_log(log: str) -> dict:
    """``regs``, ``stack``, ``spill_stores``, ``spill_loads`` from a one-kernel ``ptxas -v``
    log."""
    frame = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log
    )
    regs = re.search(r"Used (\d+) registers", log)
    if frame is None or regs is None:
        raise RuntimeError(f"no register/spill figures in the ptxas log:\n{log}")
    stack, stores, loads = (int(g) for g in frame.groups())
    return {
        "regs": int(regs.group(1)),
        "stack": stack,
        "spill_stores": stores,
        "spill_loads": loads,
    }


def _compile_with_usage(compile_fn):
    """(compiled kernel, ptxas figures): from this compile's log, else from the cache entry,
    else from a forced recompile (a kernel the cache holds from before the figures were kept)."""
    from triton.runtime.cache import get_cache_manager

    _PTXAS_LOGS.clear()
    compiled = compile_fn()
    cache = get_cache_manager(compiled.metadata.hash)
    if not _PTXAS_LOGS:
        path = cache.get_file(_USAGE_FILE)
        if path is not None:
            with open(path) as f:
                return compiled, json.load(f)
        old = os.environ.get("TRITON_ALWAYS_COMPILE")
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
        try:
            compiled = compile_fn()
        finally:
            if old is None:
                del os.environ["TRITON_ALWAYS_COMPILE"]
            else:
                os.environ["TRITON_ALWAYS_COMPILE"] = old
    if not _PTXAS_LOGS:
        raise RuntimeError("ptxas ran without a log that this worker could keep")
    usage = parse_ptxas_log(_PTXAS_LOGS[-1])
    cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
    return compiled, usage


def _compile_one(fn, cfg: dict, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # autotuner/heuristics wrappers
        fn = fn.fn
    constexprs = dict(cfg.get("constexprs", {}))
    # In the kernel's argument order: Triton 3.2 reads the signature by position, so a config
    # listing its arguments in another order would type each argument as its neighbour's.
    missing = [n for n in cfg["signature"] if n not in fn.arg_names]
    if missing:
        raise ValueError(f"signature names arguments the kernel does not have: {missing}")
    signature = {n: cfg["signature"][n] for n in fn.arg_names if n in cfg["signature"]}
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3
        # The JIT specialises 16-byte-aligned pointers (and ints divisible by 16) with a
        # divisibility attribute that enables vectorised and pipelined loads; compile the same
        # way, or shared memory and codegen would be those of a kernel that never runs.
        divisible = cfg.get("divisible_by_16")
        if divisible is None:
            divisible = [n for n, t in signature.items() if t.startswith("*")]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        for name in constexprs:
            signature[name] = "constexpr"
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    else:  # triton 3.2
        src = ASTSource(fn=fn, signature=signature, constants=constexprs)
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    compiled, usage = _compile_with_usage(
        lambda: triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    )
    shared = int(compiled.metadata.shared)
    return {
        "cc": cc,
        "shared": shared,
        "shared_limit": SHARED_LIMIT[cc],
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
        "ptx_bytes": len(compiled.asm.get("ptx", "")),
        "has_cubin": bool(compiled.asm.get("cubin")),
        **usage,
    }


def _worker(module: str, kernel: str, configs: list[dict], targets) -> list[dict]:
    fn = getattr(importlib.import_module(module), kernel)
    out = []
    for cfg in configs:
        for cc in targets:
            try:
                res = _compile_one(fn, cfg, cc)
            except Exception as exc:  # reported to the caller, which fails the test
                res = {"cc": cc, "error": f"{type(exc).__name__}: {exc}"}
            res["config"] = cfg
            out.append(res)
    return out


def compile_configs(module: str, kernel: str, configs: list[dict], targets=TARGETS) -> list[dict]:
    """Compile ``module.kernel`` once per (config, target) in a subprocess; one dict each.

    A config is ``{"signature": {arg: "*fp16" | "i32" | ...}, "constexprs": {...},
    "num_warps": 4, "num_stages": 3}``, optionally with ``"divisible_by_16": [arg names]``
    (default: every pointer argument, as the JIT assumes for 16-byte-aligned tensors).
    Results carry ``shared`` (bytes of shared memory the
    kernel needs) beside ``shared_limit``, ptxas's ``regs``, ``stack``, ``spill_stores`` and
    ``spill_loads`` (bytes), or ``error``.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The worker imports `module` the way this process would (tests/ included).
    env["SDVAE_AOT_WORKER"] = "1"  # tells tests/conftest.py not to turn the interpreter on
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    payload = json.dumps(
        {"module": module, "kernel": kernel, "configs": configs, "targets": list(targets)}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sdvae._aot"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _keep_ptxas_logs()
    req = json.loads(sys.stdin.read())
    result = _worker(req["module"], req["kernel"], req["configs"], req["targets"])
    print(json.dumps(result))
