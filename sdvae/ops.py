"""Ops of the C++/CUDA extension ``sdvae._C``: ``pad_conv2d``.

``pad_conv2d(x, weight, bias=None, *, stride=2, padding=(0, 1, 0, 1))`` computes
``F.conv2d(F.pad(x, padding), weight, bias, stride=stride)`` (groups 1, dilation 1) without ever
writing the padded input: the zero border is produced while the input is read. The SD VAE
encoder pads by one column right and one row bottom before each stride-2 downsample conv.

Kernels (``torch.ops.sdvae.pad_conv2d``, schema in csrc/sdvae.cpp):

* CPU (csrc/pad_conv2d.cpp): for outputs of at least 4x4, ATen's convolution (oneDNN) of x
  itself with a symmetric in-convolution padding that covers the asymmetric one, then one copy
  of the wanted outputs (a quarter of the input for stride 2); otherwise im2col of one output
  tile at a time into a GEMM, parallel over tiles. fp32 / fp16 / bf16, NCHW and channels_last.
* CUDA (csrc/cuda/pad_conv2d.cu): fp16 / bf16 run an implicit GEMM on tensor cores (WMMA, fp32
  accumulation) with the padding done by predicated (zero-filling) loads, NHWC first-class and
  NCHW through strided loads; fp32 runs a plain direct convolution (correct, not tuned).

The output keeps the input's memory format (channels_last in, channels_last out); any other
stride pattern is made contiguous first. When grad mode is on and an input requires grad, the
op runs ``pad_conv2d_reference`` so gradients stay exact. If the extension failed to load, the
op raises with the reason (``sdvae._ext.LOAD_ERROR``); it does not silently fall back.

The fake (meta) implementation is registered here, so ``torch.compile(fullgraph=True)`` traces
through the op without a graph break.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _ext

__all__ = ["pad_conv2d", "pad_conv2d_reference", "not_supported_reasons"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEFAULT_PADDING = (0, 1, 0, 1)


def pad_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 2,
    padding: Sequence[int] = _DEFAULT_PADDING,
) -> torch.Tensor:
    """Eager reference: ``F.conv2d(F.pad(x, padding), weight, bias, stride=stride)``."""
    return F.conv2d(F.pad(x, tuple(padding)), weight, bias, stride=stride)


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)


def _check_args(x, weight, bias, stride, padding) -> tuple[int, tuple[int, int, int, int]]:
    """Raise TypeError / ValueError naming the offending argument; return (stride, padding)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pad_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(
            f"pad_conv2d: bias must be a torch.Tensor or None, got {type(bias).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(f"pad_conv2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"pad_conv2d: weight must be 4-D (Cout, C, KH, KW), got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"pad_conv2d: weight has {weight.shape[1]} input channels but x has {x.shape[1]} "
            "(groups = 1)"
        )
    if min(weight.shape) < 1:
        raise ValueError(f"pad_conv2d: weight must have non-zero sizes, got {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"pad_conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if x.dtype not in _DTYPES:
        raise TypeError(f"pad_conv2d: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"pad_conv2d: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"pad_conv2d: {name} is on {t.device} but x is on {x.device}")
    if not _is_int(stride):
        raise TypeError(f"pad_conv2d: stride must be an int, got {type(stride).__name__}")
    if stride < 1:
        raise ValueError(f"pad_conv2d: stride must be >= 1, got {stride}")
    if isinstance(padding, (str, bytes)) or not isinstance(padding, Sequence):
        raise TypeError(
            "pad_conv2d: padding must be a sequence (left, right, top, bottom), "
            f"got {type(padding).__name__}"
        )
    if len(padding) != 4:
        raise ValueError(
            f"pad_conv2d: padding must have 4 values (left, right, top, bottom), got {padding!r}"
        )
    if not all(_is_int(p) for p in padding):
        raise TypeError(f"pad_conv2d: padding values must be ints, got {padding!r}")
    if any(p < 0 for p in padding):
        raise ValueError(f"pad_conv2d: padding must be non-negative, got {tuple(padding)}")
    left, right, top, bottom = padding
    hp, wp = x.shape[2] + top + bottom, x.shape[3] + left + right
    if hp < weight.shape[2] or wp < weight.shape[3]:
        raise ValueError(
            f"pad_conv2d: padded input {hp}x{wp} (x {tuple(x.shape)}, padding {tuple(padding)}) "
            f"is smaller than the weight's kernel {weight.shape[2]}x{weight.shape[3]}"
        )
    return stride, (left, right, top, bottom)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def not_supported_reasons(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> list[str]:
    """Why ``pad_conv2d`` would not run its compiled kernel for these inputs ([] when it does).

    Grad-requiring inputs run the eager reference; the other reasons make the op raise."""
    reasons = []
    if not _ext.available():
        reasons.append(_ext.LOAD_ERROR or "sdvae._C is not available")
    if x.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {x.device.type} has no kernel (cpu and cuda only)")
    elif x.device.type == "cuda" and _ext.available() and not _ext.with_cuda():
        reasons.append(f"sdvae._C was built without CUDA kernels ({_ext.build_info()})")
    if x.dtype not in _DTYPES:
        reasons.append(f"dtype {x.dtype} is not float32, float16 or bfloat16")
    if (
        x.device.type == "cuda"
        and x.dtype != torch.float32
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(x.device)[0] < 8
    ):
        reasons.append("the fp16/bf16 tensor-core kernel needs compute capability 8.0 or newer")
    if _needs_grad(x, weight, bias):
        reasons.append("an input requires grad: the eager reference runs (inference kernel)")
    return reasons


def pad_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 2,
    padding: Sequence[int] = _DEFAULT_PADDING,
) -> torch.Tensor:
    """``F.conv2d(F.pad(x, padding), weight, bias, stride=stride)`` without the padded copy.

    x: (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last; weight: (Cout, C, KH, KW);
    bias: (Cout,) or None; padding: (left, right, top, bottom), non-negative.
    Returns (N, Cout, OH, OW) in x's memory format."""
    stride, padding = _check_args(x, weight, bias, stride, padding)
    if _needs_grad(x, weight, bias):
        return pad_conv2d_reference(x, weight, bias, stride=stride, padding=padding)
    if not _ext.available():
        raise RuntimeError(f"sdvae.ops.pad_conv2d needs the compiled extension: {_ext.LOAD_ERROR}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"pad_conv2d: x must be on cpu or cuda, got {x.device}")
    if x.device.type == "cuda" and not _ext.with_cuda():
        raise RuntimeError(
            "sdvae.ops.pad_conv2d got CUDA tensors but sdvae._C was built without CUDA kernels "
            f"({_ext.build_info()}); rebuild with nvcc and a CUDA build of torch"
        )
    return torch.ops.sdvae.pad_conv2d(x, weight, bias, stride, list(padding))


def _pad_conv2d_fake(x, weight, bias, stride, padding):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    left, right, top, bottom = padding
    oh = (h + top + bottom - kh) // stride + 1
    ow = (w + left + right - kw) // stride + 1
    # The C++ kernels' rule: channels_last only when x is channels_last and not also contiguous.
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)


if _ext.available():
    torch.library.register_fake("sdvae::pad_conv2d")(_pad_conv2d_fake)
