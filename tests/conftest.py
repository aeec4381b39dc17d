"""Shared test set-up.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, so Triton kernels run on CPU
  tensors in the interpreter. A GPU run (``bench/device_check.sh``) sets
  ``SDVAE_TRITON_GPU=1`` to compile them for the real device instead.
* The ``cuda`` marker: tests that need an NVIDIA GPU; skipped cleanly without one.
* The ``graph_conv`` marker: tests of sdvae's cuDNN graph conv itself (no fallback allowed);
  skipped, with the build's reason, when sdvae._C has no CUDA kernels or no graph conv (e.g.
  built without cudnn-frontend).
* ``fp32_precision_restored``: snapshots torch's TF32 / fp32-precision switches and restores
  them after the test (tests that use torch's per-operator precision API).
* ``DEVICES`` / ``devices``: parametrise an op test over "cpu" and, where present, "cuda".
* The tolerance table lives in ``sdvae.numerics`` (shared with ``sdvae check``) and is
  re-exported here with ``assert_close``, the one verbose assert.
* ``aot_compile``: compiles a Triton kernel ahead of time for sm_80 and sm_90 and checks that
  it fits their shared memory (and, where the test asks, that ptxas spills no registers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# ``python -m pytest`` from the checkout puts the checkout on sys.path, where its ``kernels/``
# folder (installed as ``sdvae.kernels``) shadows the unrelated top-level ``kernels`` package
# that transformers imports: the tests see the installed layout, as users do.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]

if os.environ.get("SDVAE_TRITON_GPU") != "1" and not os.environ.get("SDVAE_AOT_WORKER"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdvae import _aot  # noqa: E402
from sdvae.config import WanConfig  # noqa: E402
from sdvae.numerics import END_TO_END, TOLERANCE, compare, tolerance  # noqa: E402, F401

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda]),
]


def graph_conv_missing_reason() -> str | None:
    """Why sdvae's cuDNN graph conv cannot run here (None when it can, given a GPU)."""
    from sdvae import _ext

    if not _ext.available():
        return f"the cuDNN graph conv is not available: {_ext.LOAD_ERROR}"
    if not _ext.with_cuda():
        return f"sdvae._C has no CUDA kernels ({_ext.build_info()})"
    if not _ext._C.graph_conv_available():
        return (
            "sdvae._C was built without the cuDNN graph conv (no cudnn-frontend headers at "
            f"build time: pip install nvidia-cudnn-frontend, then rebuild): {_ext.build_info()}"
        )
    return None


def pytest_report_header(config):
    try:
        import triton
    except ImportError:
        return "triton: not installed"
    return f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})"


def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
        return
    missing = graph_conv_missing_reason()
    if missing is not None:
        skip = pytest.mark.skip(reason=missing)
        for item in items:
            if "graph_conv" in item.keywords:
                item.add_marker(skip)


def assert_close(out, ref, dtype=None, *, tol=None, end_to_end=False, tf32=False, name="output"):
    """Fail with rel. error, max-abs error and the worst index unless within the table."""
    if dtype is None:
        dtype = out.dtype
    if tol is None:
        tol = tolerance(dtype, end_to_end=end_to_end, tf32=tf32)
    rep = compare(out, ref)
    assert rep.ok(tol), f"{name} ({dtype}): {rep.describe()} > tol {tol:.1e}"
    return rep


def aot_compile(
    module: str, kernel: str, configs: list[dict], targets=_aot.TARGETS, *, no_spills=False
):
    """Compile ``module.kernel`` for each config on sm_80 and sm_90; fail on any error, on
    shared memory over the target's limit, and with ``no_spills`` on a register spill
    (``ptxas -v``'s figure: spilled registers go to local memory, slow, and a sign the config
    is too big for the target). Returns the per-(config, target) results, which carry the
    registers and spills either way."""
    results = _aot.compile_configs(module, kernel, configs, targets)
    errors = [f"sm_{r['cc']} {r['config']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "AOT compile failed:\n" + "\n".join(errors)
    over = [
        f"sm_{r['cc']} {r['config']}: {r['shared']} B shared > {r['shared_limit']} B"
        for r in results
        if r["shared"] > r["shared_limit"]
    ]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)
    spilled = [
        f"sm_{r['cc']} {r['config']}: {r['regs']} registers, {r['spill_stores']} B spill "
        f"stores, {r['spill_loads']} B spill loads"
        for r in results
        if r["spill_stores"] or r["spill_loads"]
    ]
    if spilled:
        print(f"register spills (ptxas of triton {_triton_version()}):", *spilled, sep="\n")
    assert not (no_spills and spilled), "register spills:\n" + "\n".join(spilled)
    assert all(r["has_cubin"] for r in results)
    return results


def _triton_version() -> str:
    import triton

    return triton.__version__


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


_FP32_PRECISION_SWITCHES = [  # parents first: restoring them first keeps the children's values
    ("generic", "all"),
    ("cuda", "all"),
    ("cuda", "conv"),
    ("cuda", "rnn"),
    ("cuda", "matmul"),
    ("mkldnn", "all"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
    ("mkldnn", "matmul"),
]


@pytest.fixture
def fp32_precision_restored():
    """Restore torch's TF32 switches after the test: per operator on torch >= 2.9 (the
    effective values; torch's internal 'default' marker cannot be set back from Python), the
    legacy flags before."""
    from sdvae import _tf32

    if _tf32.per_op_api():
        get, set_ = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
        saved = []
        for b, o in _FP32_PRECISION_SWITCHES:
            try:
                saved.append((b, o, get(b, o)))
            except RuntimeError:  # a switch this torch does not have
                pass
        yield
        for b, o, value in saved:
            set_(b, o, value)
    else:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        yield
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Random inputs differ per test but the suite is reproducible run to run.
    torch.manual_seed(0)


def cuda_peak(fn) -> tuple[object, int]:
    """``(fn(), peak)``: the most bytes the CUDA caching allocator held at once during
    ``fn()`` beyond what it held when the call began."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def allocator_peak(fn) -> tuple[object, int]:
    """``(fn(), peak)``: the most bytes the CPU allocator held at once during ``fn()``
    beyond what it held when the call began (every allocation, inside ops included)."""
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:  # fmt: skip
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    cur = peak = 0
    for _, nbytes in sorted(events, key=lambda r: r[0]):
        cur += nbytes
        peak = max(peak, cur)
    return out, peak


#: Tiny Wan-family configs (a Wan 2.1 and a Wan 2.2: residual, 2x2 patches), shared by the
#: Wan tests
WAN_TINY = {
    "wan21": WanConfig.tiny(),
    "wan22": WanConfig.tiny(
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        decoder_base_dim=12,
        z_dim=6,
    ),  # fmt: skip
}
