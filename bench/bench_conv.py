"""pytest-benchmark suite for ``conv``, reusing the cases of ``sdvae bench conv``.

Run: ``.venv/bin/python -m pytest bench/bench_conv.py --benchmark-only`` (CUDA when a GPU is
visible, else the CPU cases). Not collected by ``make test`` (tests/ only). The CSV rows of
record come from ``sdvae bench``; this suite is for pytest-benchmark's comparison tooling.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sdvae.bench import cases_conv, engine

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ctx() -> engine.Context:
    return engine.Context(device=DEVICE, quick=DEVICE.type != "cuda")


def _labels() -> list[str]:
    # Iterating builds each case's inputs once and drops them: only labels are kept.
    return [
        f"{c.shape} {engine.DTYPE_NAMES[c.dtype]} {c.layout} {c.provider}"
        for c in cases_conv.cases(_ctx())
    ]


@pytest.mark.parametrize("index, label", list(enumerate(_labels())))
def test_conv(benchmark, index, label):
    case = next(itertools.islice(cases_conv.cases(_ctx()), index, None))
    benchmark.extra_info.update(flops=case.flops, nbytes=case.nbytes, label=label)
    if DEVICE.type == "cuda":

        def call():
            case.fn()
            torch.cuda.synchronize(DEVICE)

    else:
        call = case.fn
    benchmark(call)
