"""sdvae.kernels: the Triton kernels, one file per op (installed from the top-level
``kernels/`` folder as ``sdvae.kernels``).

Each op file holds the private ``@triton.jit`` kernels, a host launcher that checks its
arguments, and the eager ``<op>_reference`` that tests and benchmarks compare against.
Ops are imported on first use, so ``import sdvae`` does not pull in Triton.
"""

from __future__ import annotations

import importlib

_OPS = {
    "group_norm": "group_norm",
    "group_norm_reference": "group_norm",
    "vae_sample": "vae_sample",
    "vae_sample_reference": "vae_sample",
    "attention": "attention",
    "attention_reference": "attention",
}

__all__ = sorted(_OPS)


def __getattr__(name: str):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdvae.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
