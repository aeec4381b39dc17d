"""pytest-benchmark view of the ``vae_sample`` suite (``sdvae/bench/cases_vae_sample.py``).

Same cases, same providers; pytest-benchmark's host-clock timing (each call synchronised)
instead of the engine's CUDA events, for people who keep their numbers in pytest-benchmark.
Needs a GPU; skipped without one. ``sdvae bench vae_sample`` is the reference measurement.

    python -m pytest bench/bench_vae_sample.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from sdvae.bench import cases_vae_sample as suite
from sdvae.bench.engine import DTYPE_NAMES, Context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

_CTX = Context(device=torch.device("cuda"), quick=False)
_PLAN = [
    (shape, dtype, provider)
    for shape in suite.GPU_SHAPES
    for dtype in suite.GPU_DTYPES
    for provider in ("eager", "compile", "sdvae")
]


@pytest.mark.parametrize(
    "shape,dtype,provider",
    _PLAN,
    ids=[f"{suite.shape_label(s)}-{DTYPE_NAMES[d]}-{p}" for s, d, p in _PLAN],
)
def test_vae_sample(benchmark, shape, dtype, provider):
    ctx = Context(device=_CTX.device, quick=False, dtypes=(dtype,))
    case = next(
        c
        for c in suite.cases(ctx)
        if c.shape == suite.shape_label(shape) and c.provider == provider
    )

    def call():
        case.fn()
        torch.cuda.synchronize()

    call()  # warm-up (and torch.compile's first compile)
    benchmark.extra_info["nbytes"] = case.nbytes
    benchmark(call)
    stats = benchmark.stats  # None under --benchmark-disable
    if stats is not None and stats.stats.median:
        benchmark.extra_info["gbps"] = case.nbytes / stats.stats.median / 1e9
