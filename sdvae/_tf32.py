"""torch's TF32 switches for cuDNN convolutions and cuBLAS matmuls, read and set the way the
installed torch wants.

torch >= 2.9 keeps one fp32 precision per backend and operator
(``torch.backends.cudnn.conv.fp32_precision``, ``torch.backends.cuda.matmul.fp32_precision``,
with ``torch.backends.fp32_precision`` above them). Once a program has used that API, the legacy
getters (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``) may
raise ``RuntimeError`` (e.g. after ``torch.backends.cudnn.conv.fp32_precision = "ieee"`` the
convolution and RNN switches differ and the op-less cuDNN getter refuses to answer), and the
legacy setters warn that they are deprecated. torch 2.6-2.8 have only the legacy switches.

So every reader in sdvae asks here: ``conv_allowed()`` is "may cuDNN convolutions use TF32?"
(what torch's own convolutions and sdvae's cuDNN graph, csrc/conv2d.cpp, follow) and
``matmul_allowed()`` is the same for cuBLAS matmuls. ``switches(enabled)`` sets both for a block
and restores them afterwards.
"""

from __future__ import annotations

import contextlib

import torch
from packaging.version import Version

__all__ = ["conv_allowed", "matmul_allowed", "per_op_api", "switches"]


def per_op_api() -> bool:
    """Whether this torch has the per-operator fp32 precision API (torch >= 2.9)."""
    return Version(torch.__version__).release[:2] >= (2, 9) and hasattr(
        torch._C, "_get_fp32_precision_getter"
    )


def _precision(op: str) -> str:
    # The effective setting of the CUDA backend's operator, with the backend-wide and the
    # generic setting already applied by torch ("tf32", "ieee", or "none": not TF32).
    return torch._C._get_fp32_precision_getter("cuda", op)


def conv_allowed() -> bool:
    """May cuDNN convolutions in fp32 use TF32 tensor cores (torch's own rule)?"""
    if per_op_api():
        return _precision("conv") == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def matmul_allowed() -> bool:
    """May cuBLAS matmuls in fp32 use TF32 tensor cores (torch's own rule)?"""
    if per_op_api():
        return _precision("matmul") == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


# Per switch: (is TF32 allowed now, its setting as torch reports it, set it).
def _conv_setting():
    if per_op_api():
        return torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cudnn.allow_tf32


def _set_conv(value) -> None:
    if per_op_api():
        torch.backends.cudnn.conv.fp32_precision = value
    else:
        torch.backends.cudnn.allow_tf32 = value


def _matmul_setting():
    if per_op_api():
        return torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32


def _set_matmul(value) -> None:
    if per_op_api():
        torch.backends.cuda.matmul.fp32_precision = value
    else:
        torch.backends.cuda.matmul.allow_tf32 = value


_SWITCHES = (
    (conv_allowed, _conv_setting, _set_conv),
    (matmul_allowed, _matmul_setting, _set_matmul),
)


@contextlib.contextmanager
def switches(enabled: bool):
    """TF32 on (``enabled``) or off for cuDNN convolutions and cuBLAS matmuls in this block,
    restored afterwards, also on error.

    A switch already in the wanted state is not touched. One that is changed is set back to its
    previous effective value: with the per-operator API that value is then set on the operator
    itself (where it may before have come from ``torch.backends.fp32_precision`` or torch's
    default), as torch's own ``torch.backends.cudnn.flags`` does. Only the convolution and
    matmul settings are touched (cuDNN RNNs and other backends keep theirs)."""
    enabled = bool(enabled)
    wanted = ("tf32" if enabled else "ieee") if per_op_api() else enabled
    undo = []
    try:
        for allowed, setting, set_ in _SWITCHES:
            if allowed() != enabled:
                previous = setting()
                set_(wanted)
                undo.append((set_, previous))
        yield
    finally:
        for set_, previous in reversed(undo):
            set_(previous)
