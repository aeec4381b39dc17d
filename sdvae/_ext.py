"""Loads the compiled extension ``sdvae._C`` if it can, and remembers why not.

An import that cannot load the extension keeps the Triton and reference paths working;
``sdvae check`` prints the reason.
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10/libtorch, which sdvae._C links against)

_C = None
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("sdvae._C")
except (ImportError, OSError) as exc:  # not built, or built against another torch
    LOAD_ERROR = f"sdvae._C could not be loaded: {exc}"


def available() -> bool:
    return _C is not None


def extension():
    """The loaded ``sdvae._C`` module (None when it could not be loaded: ``LOAD_ERROR``)."""
    return _C


def build_info() -> str:
    if _C is None:
        return LOAD_ERROR or "sdvae._C is not available"
    return _C.build_info()


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda())
