"""Ops of the C++/CUDA extension ``sdvae._C``: ``conv2d`` and ``pad_conv2d``.

``conv2d(x, weight, bias=None, *, stride=1, padding=(1, 1, 1, 1), residual=None)`` computes
``F.conv2d(F.pad(x, padding), weight, bias, stride=stride) + residual`` (groups 1, dilation 1;
padding in F.pad order: left, right, top, bottom) without ever writing the padded input.
``pad_conv2d(x, weight, bias=None, *, stride=2, padding=(0, 1, 0, 1))`` is the same op without
a residual, with the SD VAE encoder's downsample defaults (one column right, one row bottom).

Kernels (``torch.ops.sdvae.conv2d`` / ``torch.ops.sdvae.pad_conv2d``, schemas in csrc/sdvae.cpp):

* CUDA (csrc/conv2d.cpp, csrc/cuda/conv2d.cpp): one cuDNN graph built with cudnn-frontend's
  C++ API: the padding as the conv's pre (top, left) / post (bottom, right) padding, and with
  ``fuse_epilogue`` (the default) bias and residual as pointwise adds in the same graph (fp32
  between the nodes, one rounding). ``fuse_epilogue=False`` runs the bare graph conv and adds bias
  and residual afterwards (the bench compares both). One execution plan per call shape and
  thread (each thread has its own cuDNN handle), built on first use and cached in C++
  (``plan_stats()``). fp32 follows torch's TF32 switch for convolutions
  (``torch.backends.cudnn.conv.fp32_precision`` on torch >= 2.9, else
  ``torch.backends.cudnn.allow_tf32``). A fused graph cuDNN refuses steps down to the bare graph
  + ATen adds; a bare graph it refuses, or an extension built without cudnn-frontend, runs eager
  (``F.pad`` + ``F.conv2d`` + add). Each step down is recorded with its reason in
  ``fallback_reasons()`` (``sdvae check`` prints it) and warned once; a failure for now (out of
  memory while building a plan or allocating its workspace) is not cached, the next call tries
  the graph again. Engines that want a workspace over ``SDVAE_CONV_WORKSPACE_LIMIT`` bytes
  (default 1 GiB; a KiB / MiB / GiB suffix is allowed), or over the calling thread's
  ``workspace_limit(nbytes)`` inside such a block (what a call with a memory budget runs
  under), are never chosen; the limit is part of the plan cache's key. Tensors of 2**31
  elements or more never reach cuDNN (32-bit indexing): the batch is split into chunks under
  that, as torch does; a single sample that large runs eager, recorded.
* CPU (csrc/pad_conv2d.cpp): for outputs of at least 4x4, ATen's convolution (oneDNN) of x
  itself with a symmetric in-convolution padding that covers the asymmetric one, then one copy
  of the wanted outputs; otherwise im2col of one output tile at a time into a GEMM, parallel
  over tiles. ``conv2d`` adds the residual in place afterwards. fp32 / fp16 / bf16.

The output keeps the input's memory format (channels_last in, channels_last out); any other
stride pattern is made contiguous first (on CUDA the weight and residual are brought to x's
format too: keep them there to avoid a copy per call). When grad mode is on and an input
requires grad, the ops run the eager reference so gradients stay exact. If the extension failed
to load, the ops raise with the reason (``sdvae._ext.LOAD_ERROR``).

The fake (meta) implementations are registered here, so ``torch.compile(fullgraph=True)``
traces through both ops without a graph break.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _ext

__all__ = [
    "conv2d",
    "conv2d_reference",
    "pad_conv2d",
    "pad_conv2d_reference",
    "not_supported_reasons",
    "fallback_reasons",
    "plan_stats",
    "workspace_limit",
    "output_like",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEFAULT_PADDING = (0, 1, 0, 1)
_CONV_PADDING = (1, 1, 1, 1)

# Read once at import: both are pybind calls, which torch.compile cannot trace inside the ops.
_WITH_CUDA = _ext.with_cuda()
_GRAPH_CONV = _ext.available() and bool(_ext.extension().graph_conv_available())


def conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    padding: Sequence[int] = _CONV_PADDING,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: ``F.conv2d(F.pad(x, padding), weight, bias, stride) + residual``."""
    y = F.conv2d(F.pad(x, tuple(padding)), weight, bias, stride=stride)
    return y if residual is None else y + residual


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


def _check_args(
    op, x, weight, bias, stride, padding, residual=None
) -> tuple[int, tuple[int, int, int, int]]:
    """Raise TypeError / ValueError naming the offending argument; return (stride, padding)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"{op}: weight must be 4-D (Cout, C, KH, KW), got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: weight has {weight.shape[1]} input channels but x has {x.shape[1]} (groups = 1)"
        )
    if min(weight.shape) < 1:
        raise ValueError(f"{op}: weight must have non-zero sizes, got {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not _is_int(stride):
        raise TypeError(f"{op}: stride must be an int, got {type(stride).__name__}")
    if stride < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {stride}")
    if isinstance(padding, (str, bytes)) or not isinstance(padding, Sequence):
        raise TypeError(
            f"{op}: padding must be a sequence (left, right, top, bottom), "
            f"got {type(padding).__name__}"
        )
    if len(padding) != 4:
        raise ValueError(
            f"{op}: padding must have 4 values (left, right, top, bottom), got {padding!r}"
        )
    if not all(_is_int(p) for p in padding):
        raise TypeError(f"{op}: padding values must be ints, got {padding!r}")
    if any(p < 0 for p in padding):
        raise ValueError(f"{op}: padding must be non-negative, got {tuple(padding)}")
    left, right, top, bottom = padding
    hp, wp = x.shape[2] + top + bottom, x.shape[3] + left + right
    if hp < weight.shape[2] or wp < weight.shape[3]:
        raise ValueError(
            f"{op}: padded input {hp}x{wp} (x {tuple(x.shape)}, padding {tuple(padding)}) "
            f"is smaller than the weight's kernel {weight.shape[2]}x{weight.shape[3]}"
        )
    if residual is not None:
        out = (
            x.shape[0],
            weight.shape[0],
            (hp - weight.shape[2]) // stride + 1,
            (wp - weight.shape[3]) // stride + 1,
        )
        if tuple(residual.shape) != out:
            raise ValueError(
                f"{op}: residual must have the output's shape {out}, got {tuple(residual.shape)}"
            )
    return stride, (left, right, top, bottom)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def not_supported_reasons(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> list[str]:
    """Why ``pad_conv2d`` / ``conv2d`` would not run their compiled kernel for these inputs
    ([] when they do, as far as can be told before cuDNN sees the shape: a graph cuDNN refuses
    at the first call is listed by ``fallback_reasons()`` afterwards).

    Grad-requiring inputs, and CUDA tensors with an extension built without cudnn-frontend, run
    eager; the other reasons make the ops raise."""
    reasons = []
    if not _ext.available():
        reasons.append(_ext.LOAD_ERROR or "sdvae._C is not available")
    if x.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {x.device.type} has no kernel (cpu and cuda only)")
    elif x.device.type == "cuda" and _ext.available():
        if not _WITH_CUDA:
            reasons.append(f"sdvae._C was built without CUDA kernels ({_ext.build_info()})")
        elif not _GRAPH_CONV:
            reasons.append(
                "sdvae._C was built without cudnn-frontend: convolutions run eager "
                "(pip install nvidia-cudnn-frontend, then rebuild)"
            )
    if x.dtype not in _DTYPES:
        reasons.append(f"dtype {x.dtype} is not float32, float16 or bfloat16")
    if _needs_grad(x, weight, bias, residual):
        reasons.append("an input requires grad: the eager reference runs (inference kernel)")
    return reasons


def fallback_reasons() -> list[str]:
    """Every distinct case (op, shape, dtype, layout, epilogue) in which ``conv2d`` or
    ``pad_conv2d`` on CUDA did not run the graph it was asked for in this process: the bare
    cuDNN graph + ATen adds instead of the fused one, or eager instead of either, each with
    what was taken and why (cuDNN's message); also warned once each. Empty on the CPU and
    without the extension."""
    return list(_ext.extension().conv2d_fallbacks()) if _ext.available() else []


def plan_stats() -> dict[str, int]:
    """Counters of the cuDNN graph cache: ``built`` (plans built), ``refused`` (graphs cuDNN
    refused, cached as such: the ladder steps down for them since), ``transient`` (builds that
    failed for now, e.g. out of memory: not cached), ``cached`` (entries in the cache, one per
    key and thread)."""
    if not _ext.available():
        return {"built": 0, "refused": 0, "transient": 0, "cached": 0}
    built, refused, transient, cached = _ext.extension().conv2d_stats()
    return {"built": built, "refused": refused, "transient": transient, "cached": cached}


@contextlib.contextmanager
def workspace_limit(nbytes: int):
    """Cap the cuDNN workspace of the ``conv2d`` / ``pad_conv2d`` calls this thread makes
    inside the block at ``nbytes`` (over ``SDVAE_CONV_WORKSPACE_LIMIT``); the cap in force
    before is restored after it, so blocks nest. Engines that want more are filtered out
    before a plan is chosen (plans are cached per cap); with none left the conv steps down
    the fallback ladder, recorded in ``fallback_reasons()``. Other threads are unaffected."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if not _ext.available():  # no extension, no conv to cap
        yield
        return
    previous = _ext.extension().conv2d_set_workspace_limit(int(nbytes))
    try:
        yield
    finally:
        _ext.extension().conv2d_set_workspace_limit(previous)


def _check_device(op: str, x: torch.Tensor) -> None:
    if not _ext.available():
        raise RuntimeError(f"sdvae.ops.{op} needs the compiled extension: {_ext.LOAD_ERROR}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: x must be on cpu or cuda, got {x.device}")
    if x.device.type == "cuda" and not _WITH_CUDA:
        raise RuntimeError(
            f"sdvae.ops.{op} got CUDA tensors but sdvae._C was built without CUDA kernels "
            f"({_ext.build_info()}); rebuild with nvcc and a CUDA build of torch"
        )


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    padding: Sequence[int] = _CONV_PADDING,
    residual: torch.Tensor | None = None,
    fuse_epilogue: bool = True,
) -> torch.Tensor:
    """``F.conv2d(F.pad(x, padding), weight, bias, stride=stride) + residual``, one cuDNN call.

    x: (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last; weight: (Cout, C, KH, KW);
    bias: (Cout,) or None; padding: (left, right, top, bottom), non-negative; residual: the
    output's shape or None. ``fuse_epilogue``: bias and residual inside the cuDNN graph (else
    added after the bare conv; CUDA only, the CPU result is the same either way).
    Returns (N, Cout, OH, OW) in x's memory format."""
    stride, padding = _check_args("conv2d", x, weight, bias, stride, padding, residual)
    if not isinstance(fuse_epilogue, bool):
        raise TypeError(f"conv2d: fuse_epilogue must be a bool, got {type(fuse_epilogue).__name__}")
    if _needs_grad(x, weight, bias, residual):
        return conv2d_reference(x, weight, bias, stride=stride, padding=padding, residual=residual)
    _check_device("conv2d", x)
    return torch.ops.sdvae.conv2d(x, weight, bias, stride, list(padding), residual, fuse_epilogue)


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
    stride, padding = _check_args("pad_conv2d", x, weight, bias, stride, padding)
    if _needs_grad(x, weight, bias):
        return pad_conv2d_reference(x, weight, bias, stride=stride, padding=padding)
    _check_device("pad_conv2d", x)
    return torch.ops.sdvae.pad_conv2d(x, weight, bias, stride, list(padding))


def output_like(x, weight, stride, padding):
    """An empty tensor shaped, typed and laid out as ``conv2d``'s output (the fake kernel; the
    banded path's shape-only runs on the meta device)."""
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    left, right, top, bottom = padding
    oh = (h + top + bottom - kh) // stride + 1
    ow = (w + left + right - kw) // stride + 1
    # The C++ kernels' rule: channels_last only when x is channels_last and not also contiguous.
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)


def _pad_conv2d_fake(x, weight, bias, stride, padding):
    return output_like(x, weight, stride, padding)


def _conv2d_fake(x, weight, bias, stride, padding, residual, fuse_epilogue):
    return output_like(x, weight, stride, padding)


if _ext.available():
    torch.library.register_fake("sdvae::pad_conv2d")(_pad_conv2d_fake)
    torch.library.register_fake("sdvae::conv2d")(_conv2d_fake)
