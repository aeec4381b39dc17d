"""Ahead-of-time compilation of Triton kernels for GPUs that are not present.

``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` needs no GPU, but it needs the real
``@triton.jit`` functions, which ``TRITON_INTERPRET=1`` replaces; so the compile runs in a
fresh interpreter without that variable (``python -m sdvae._aot``), one process per call,
every configuration of the call in it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

#: Opt-in shared memory per block, bytes (A100: 163 KiB; H100/H200: 227 KiB).
SHARED_LIMIT = {80: 166912, 90: 232448}
TARGETS = (80, 90)


def _compile_one(fn, cfg: dict, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # autotuner/heuristics wrappers
        fn = fn.fn
    constexprs = dict(cfg.get("constexprs", {}))
    signature = dict(cfg["signature"])
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
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    shared = int(compiled.metadata.shared)
    return {
        "cc": cc,
        "shared": shared,
        "shared_limit": SHARED_LIMIT[cc],
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
        "ptx_bytes": len(compiled.asm.get("ptx", "")),
        "has_cubin": bool(compiled.asm.get("cubin")),
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
    kernel needs) beside ``shared_limit``, or ``error``.
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
    req = json.loads(sys.stdin.read())
    result = _worker(req["module"], req["kernel"], req["configs"], req["targets"])
    print(json.dumps(result))
