"""How each op runs: the fused kernel or eager PyTorch, decided in one place, with the reasons.

Every caller goes through this module: sdvae's own modules (their ``fused`` switches),
``sdvae.optimize``, the diffusers patch, and both executors (the whole-tensor path and the
banded one, ``sdvae.stream``). Nothing here knows a model family: it takes tensors and the
parameters of one op.

* **Availability** (``op_status``): whether each fused op can be imported and loaded at all.
* **Reasons** (``*_reasons``): why an op of a given shape, device and dtype cannot run fused
  (the op's own ``not_supported_reasons`` asked about an input of that shape, outside grad
  mode), and the banded path's extra rule (``band_fused``: float64 runs the eager ops, whose
  float64 accumulation the streamed path's exactness tests rely on).
* **The autocast cast** (``cast_like``): weights in another dtype than the activations (under
  autocast) are cast to the activations' dtype, as autocast's own conv would.
* **Execution**: ``conv2d`` / ``pad_conv2d`` (``sdvae.ops``' cuDNN graph, else ``F.conv2d``),
  ``group_norm`` (``sdvae.kernels.group_norm`` with its input bias and in-place rule, else
  ``F.group_norm``), ``attention`` (``sdvae.kernels.attention``, else SDPA), and the folded
  upsampler (``upsample``: nearest x2 + 3x3 conv as one stride-2 transposed conv with a 4x4
  weight folded from the 3x3 one, kept on its owner module and refolded when the weight
  changes).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import weakref

import torch
import torch.nn.functional as F

__all__ = [
    "op_status",
    "group_norm_reasons",
    "attention_reasons",
    "conv_reasons",
    "sample_reasons",
    "band_group_norm_reasons",
    "band_fused",
    "cast_like",
    "conv2d",
    "pad_conv2d",
    "conv3d",
    "group_norm",
    "rms_norm_reasons",
    "rms_norm",
    "may_overwrite",
    "attention",
    "fold_upsample_weight",
    "fold_is_current",
    "refold_upsample",
    "upsample",
    "tensors_key",
    "tensors_unchanged",
    "derived",
    "capturing",
    "weights_of",
    "metered",
    "sdpa_extra_bytes",
    "cpu_conv_extra",
]


# ---------------------------------------------------------------------- availability
def _import_reasons(module: str, name: str) -> list[str]:
    try:
        mod = importlib.import_module(module)
        getattr(mod, name)
    except (ImportError, AttributeError) as exc:
        return [f"{module}.{name} is not available: {exc}"]
    return []


def op_status() -> dict[str, list[str]]:
    """For each fused op, the reasons it cannot be used here (empty list: usable)."""
    status = {
        "group_norm": _import_reasons("sdvae.kernels.group_norm", "group_norm"),
        "rms_norm": _import_reasons("sdvae.kernels.rms_norm", "rms_norm"),
        "attention": _import_reasons("sdvae.kernels.attention", "attention"),
        "vae_sample": _import_reasons("sdvae.kernels.vae_sample", "vae_sample"),
        "pad_conv2d": _import_reasons("sdvae.ops", "pad_conv2d"),
        "conv2d": _import_reasons("sdvae.ops", "conv2d"),
    }
    for op in ("pad_conv2d", "conv2d"):
        if not status[op]:
            from . import _ext

            if not _ext.available():
                status[op].append(_ext.LOAD_ERROR or "sdvae._C is not available")
    return status


# --------------------------------------------------------------------------- reasons
def group_norm_reasons(channels, groups, weight, bias, eps, *, silu, device, dtype) -> list[str]:
    """Why a GroupNorm(+SiLU) of ``channels`` cannot run the fused kernel ([] when it can)."""
    from .kernels.group_norm import not_supported_reasons

    with torch.no_grad():
        x = torch.empty(1, channels, 2, 2, device=device, dtype=dtype)
        return not_supported_reasons(x, groups, weight, bias, eps, silu=silu)


def rms_norm_reasons(channels: int, weight, *, silu: bool, device, dtype) -> list[str]:
    """Why a channel RMS norm(+SiLU) of ``channels`` (the Wan family's) cannot run the fused
    kernel ([] when it can)."""
    from .kernels.rms_norm import not_supported_reasons

    with torch.no_grad():
        x = torch.empty(1, channels, 1, 2, 2, device=device, dtype=dtype)
        return not_supported_reasons(x, weight, silu=silu)


def attention_reasons(heads: int, head_dim: int, scale, *, device, dtype) -> list[str]:
    """Why an attention of ``heads`` heads of ``head_dim`` cannot run the fused kernel."""
    from .kernels.attention import not_supported_reasons

    with torch.no_grad():
        if heads == 1:
            q = torch.empty(1, 4, head_dim, device=device, dtype=dtype)
        else:
            q = torch.empty(1, heads, 4, head_dim, device=device, dtype=dtype)
        return not_supported_reasons(q, q, q, scale=scale)


def conv_reasons(weight, bias, *, device, dtype, padded: bool = False) -> list[str]:
    """Why a conv with ``weight`` cannot run ``sdvae.ops`` on ``device``/``dtype``. A
    stride-1 conv (``padded=False``) stays on ``F.conv2d`` on a CPU without Triton's
    interpreter, as in eager (oneDNN); the padded stride-2 conv has its own C++ CPU kernel."""
    from .ops import not_supported_reasons

    if not padded and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["CPU without TRITON_INTERPRET=1: F.conv2d (oneDNN) runs, as in eager"]
    with torch.no_grad():
        x = torch.empty(1, weight.shape[1], 4, 4, device=device, dtype=dtype)
        return not_supported_reasons(x, weight, bias)


def sample_reasons(latent_channels: int, *, device, dtype) -> list[str]:
    """Why the sampling step cannot run the fused kernel."""
    from .kernels.vae_sample import not_supported_reasons

    with torch.no_grad():
        return not_supported_reasons(
            torch.empty(1, 2 * latent_channels, 2, 2, device=device, dtype=dtype)
        )


def band_group_norm_reasons(*, device, dtype) -> list[str]:
    """Why the banded path's GroupNorm kernels (per-band statistics, Chan merge, apply:
    ``sdvae.kernels.group_norm_band``) cannot run on ``device``/``dtype``."""
    from .kernels import group_norm_band as gnb

    with torch.no_grad():
        return gnb.not_supported_reasons(torch.empty(1, 1, 1, 1, dtype=dtype, device=device), 1)


def band_fused(fused: bool, dtype: torch.dtype) -> bool:
    """Whether the banded path runs an op fused that the model runs ``fused``: float64 runs
    the eager ops (the kernels take no float64; the streamed path's exactness is tested in
    float64 against the eager model)."""
    return bool(fused) and dtype != torch.float64


# ------------------------------------------------------------- shape-only runs (meta)
#: The measurement in progress in this thread (``metered``): the tracker to tell what an op
#: holds inside itself, and the device the estimate is for.
_METER = threading.local()


def _round16(c: int) -> int:
    return (c + 15) // 16 * 16


def cpu_conv_extra(x_shape, w_shape, out_hw, dtype: torch.dtype, channels_last: bool,
                   x_size=None) -> int:  # fmt: skip
    """Bytes ``F.conv2d`` / ``F.conv3d`` hold inside themselves on the CPU at their peak,
    beyond what is live before the call, the output included (measured with the allocator's
    own count, on an AVX-512 CPU, where oneDNN's blocks are 16 channels; an upper bound for
    8):

    * fp32 / bf16 (oneDNN): its weights reordered (twice at once); contiguous operands
      reordered to a blocked layout with channels rounded up to 16 (the input when it has 8
      channels or more, and the output), then the output reordered back. bf16 1x1 convs on
      NCHW go through fp32 buffers. channels-last operands need no reorder.
    * fp16 / float64 (ATen's ``slow_conv2d`` / ``slow_conv3d``): the im2col columns (none
      for 1x1).

    A 3-D conv in fp32 takes oneDNN only where ATen does (kernels over 3x3, a batch, or more
    than 20480 elements in the input's first four dims, ``x_size``: the unpadded input's
    shape), elsewhere its im2col path, as fp16's. 2-D convs are still counted as oneDNN
    throughout: ATen's same rule sends small fp32 inputs to im2col, which holds more (the
    planner's allocator-level debt, issue 27; the sdvae-family CPU tests count tensors).

    ``x_shape`` is the padded input's; ``out_hw`` the output's spatial sizes (2 or 3)."""
    n, c, *sp = x_shape
    cout, _, *k = w_shape
    px, po, pk = math.prod(sp), math.prod(out_hw), math.prod(k)
    e = torch.empty((), dtype=dtype).element_size()
    y = n * cout * po * e
    size = x_size if x_size is not None else x_shape
    onednn = (k[-1] > 3 and k[-2] > 3) or n > 1 or math.prod(size[:4]) > 20480  # ATen's rule
    if dtype == torch.float32 and len(k) == 3 and not onednn:
        return (n * c * pk * po * e if pk != 1 else 0) + y
    if dtype in (torch.float32, torch.bfloat16):
        weights = 2 * cout * c * pk * e
        if channels_last:
            return weights + y
        if dtype == torch.bfloat16 and pk == 1:
            xb = n * c * px * e
            return 4 * max(xb, y) + xb + y
        src = n * _round16(c) * px * e if c >= 8 else 0
        dst = n * _round16(cout) * po * e
        return max(src + weights + dst, dst + y)
    cols = n * c * pk * po * e if pk != 1 else 0
    return cols + y


def _tuple(v, dims: int) -> tuple[int, ...]:
    return (int(v),) * dims if isinstance(v, int) else tuple(int(u) for u in v)


class _MetaOps(torch.overrides.TorchFunctionMode):
    """Library calls on meta tensors, whoever makes them (ours, ``nn.Conv2d``'s, diffusers'),
    counted as they run on the real device:

    * ``F.conv2d`` on the CPU: what it holds inside itself (``cpu_conv_extra``);
    * ``F.scaled_dot_product_attention`` as ``attention(fused=False)`` counts it: the meta
      kernel would allocate the math path's (Lq, Lk) scores, which no real backend but
      float64's on CUDA holds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].is_meta and len(args) == 3:
            if set(kwargs) <= {"scale"}:
                return attention(*args, scale=kwargs.get("scale"), fused=False)
        conv = func is torch.conv2d or func is torch.conv3d
        if conv and args and args[0].is_meta and _real().type == "cpu":
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            a = {**dict(zip(names, args)), **kwargs}
            x, w = a["input"], a["weight"]
            dims = x.dim() - 2
            stride, pad = _tuple(a.get("stride", 1), dims), a.get("padding", 0)
            if isinstance(pad, str):
                pad = (0,) * dims if pad == "valid" else tuple(k // 2 for k in w.shape[2:])
            pad = _tuple(pad, dims)
            padded = [s + 2 * p for s, p in zip(x.shape[2:], pad)]
            out = tuple((s - k) // st + 1 for s, k, st in zip(padded, w.shape[2:], stride))
            fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
            cl = x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
            _spike(cpu_conv_extra((x.shape[0], x.shape[1], *padded), tuple(w.shape), out,
                                  x.dtype, cl, tuple(x.shape)))  # fmt: skip
        return func(*args, **kwargs)


@contextlib.contextmanager
def metered(tracker, real: torch.device):
    """Shape-only runs on the meta device (the planner's measurements) inside this block
    count what the ops hold inside themselves, as on ``real``, with
    ``tracker.spike(nbytes)`` (``sdvae.memtrack.TensorMemory``): memory no tensor shows."""
    saved = getattr(_METER, "value", None)
    _METER.value = (tracker, torch.device(real))
    try:
        with _MetaOps():
            yield
    finally:
        _METER.value = saved


def _spike(nbytes: int, on: str | None = None) -> None:
    """Count ``nbytes`` held inside an op, when measuring for a ``real`` device of type ``on``
    (any, with None)."""
    m = getattr(_METER, "value", None)
    if m is not None and (on is None or m[1].type == on):
        m[0].spike(int(nbytes))


def _real() -> torch.device:
    m = getattr(_METER, "value", None)
    return m[1] if m is not None else torch.device("cpu")


def sdpa_extra_bytes(device, q_shape, lk: int, dtype: torch.dtype) -> int:
    """The most bytes ``F.scaled_dot_product_attention`` holds beside its inputs and its
    output for the VAE's attention (queries of ``q_shape`` (N, heads, Lq, D) against ``lk``
    keys, no mask, no grad) on ``device`` in ``dtype``:

    * CUDA, float64: no fused backend takes float64, so its math path runs: q scaled (a
      copy), with k^T scaled (a copy) and the (Lq, Lk) scores, then the scores with their
      softmax;
    * CUDA, fp16/bf16 with D > 128 (the VAE's D is 512: past flash's and cuDNN's head dims):
      the memory-efficient kernel, which for more than 128 value columns accumulates its
      output in an fp32 buffer of q's shape (``kNeedsOutputAccumulatorBuffer``);
    * otherwise (CUDA fp32: memory-efficient, output accumulated in place; the CPU's flash
      kernel, every dtype): the logsumexp at most."""
    n, heads, lq, d = q_shape
    lse = n * heads * lq * 4
    if torch.device(device).type != "cuda":
        return lse
    if dtype == torch.float64:
        q, k, scores = (n * heads * s * 8 for s in (lq * d, lk * d, lq * lk))
        return q + max(k + scores, 2 * scores)
    if dtype in (torch.float16, torch.bfloat16) and d > 128:
        return lse + n * heads * lq * d * 4
    return lse


# ------------------------------------------------------------------ the autocast cast
def cast_like(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """``(w, b)`` in ``x``'s dtype: under autocast the activations are in the autocast dtype
    while the weights are not, and autocast's own conv casts them the same way."""
    if w.dtype != x.dtype:
        w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
    return w, b


# ------------------------------------------------------------------------------ convs
def conv2d(x, weight, bias, *, fused: bool, stride: int = 1, padding=(1, 1, 1, 1),
           residual=None):  # fmt: skip
    """``conv2d(F.pad(x, padding), weight, bias, stride) + residual`` (padding in F.pad order:
    left, right, top, bottom): fused, one ``sdvae.ops.conv2d`` (cuDNN graph with bias and
    residual in its epilogue); eager, ``F.conv2d`` with its own padding where the padding is
    symmetric (rows padded by ``F.pad`` where only they are not), then the add."""
    weight, bias = cast_like(x, weight, bias)
    if fused:
        from . import ops

        if x.is_meta:  # shape only; the C++ CPU kernel copies its output once inside
            y = ops.output_like(x, weight, stride, padding)
            _spike(y.nbytes, "cpu")
            return y
        return ops.conv2d(x, weight, bias, stride=stride, padding=tuple(padding),
                          residual=residual)  # fmt: skip
    left, right, top, bottom = padding
    if left != right:
        x, left, right, top, bottom = F.pad(x, tuple(padding)), 0, 0, 0, 0
    elif top != bottom:
        x, top, bottom = F.pad(x, (0, 0, top, bottom)), 0, 0
    y = F.conv2d(x, weight, bias, stride, (top, left))
    return y if residual is None else y + residual


def pad_conv2d(x, weight, bias, *, fused: bool, stride: int = 2, padding=(0, 1, 0, 1)):
    """The encoder's downsample: ``conv2d(F.pad(x, padding), weight, bias, stride)``, fused
    without the padded copy (``sdvae.ops.pad_conv2d``)."""
    weight, bias = cast_like(x, weight, bias)
    if fused:
        from . import ops

        if x.is_meta:
            y = ops.output_like(x, weight, stride, padding)
            _spike(y.nbytes, "cpu")
            return y
        return ops.pad_conv2d(x, weight, bias, stride=stride, padding=tuple(padding))
    return F.conv2d(F.pad(x, tuple(padding)), weight, bias, stride)


def conv3d(x, weight, bias, stride=1, padding=0) -> torch.Tensor:
    """``F.conv3d`` (the fused Wan path's), its output channels_last_3d when ``x`` is, as
    cuDNN returns it on CUDA. ATen's CPU and meta kernels return NCDHW: the CPU's result is
    copied (one more pass, on the CPU only), and a shape-only run for a GPU (the planner's)
    is given the layout directly, holding what the GPU holds. So runs, tests and op traces on
    the CPU take the layout-dependent paths (the norms writing into frame buffers, the
    in-place temporal upsampler) that the GPU takes."""
    weight, bias = cast_like(x, weight, bias)
    y = F.conv3d(x, weight, bias, stride, padding)
    fmt = torch.channels_last_3d
    if not (x.is_contiguous(memory_format=fmt) and not x.is_contiguous()):
        return y
    if y.is_contiguous(memory_format=fmt) and not y.is_contiguous():
        return y
    if y.is_meta and _real().type != "cpu":
        shape, dtype = y.shape, y.dtype
        del y
        return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
    return y.contiguous(memory_format=fmt)


# -------------------------------------------------------------------------- GroupNorm
def may_overwrite(x, *params) -> bool:
    """Whether a fused GroupNorm may write its result over ``x``: for inference only, not
    under torch.compile (which plans memory itself) and not when autograd records the call
    (it may need x for the backward)."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in (x, *params))


def group_norm(x, groups: int, weight, bias, eps: float, *, silu: bool, fused: bool,
               input_bias=None, inplace: bool = False):  # fmt: skip
    """GroupNorm(+SiLU) of ``x + input_bias[c]``. Fused: one ``sdvae.kernels.group_norm``
    (the bias added in its loads; with ``inplace`` the result may be written over ``x`` when
    ``may_overwrite`` allows: callers use the returned tensor). Eager: the add, then
    ``F.group_norm`` and ``F.silu``."""
    if fused:
        from . import kernels

        out = x if inplace and may_overwrite(x, weight, bias, input_bias) else None
        if x.is_meta:  # shape only: the kernel writes x's layout (its statistics: bytes)
            return out if out is not None else torch.empty_like(x)
        return kernels.group_norm(x, groups, weight, bias, eps, silu=silu,
                                  input_bias=input_bias, out=out)  # fmt: skip
    if input_bias is not None:
        x = x + input_bias.view(1, -1, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


# --------------------------------------------------------------------------- RMS norm
def rms_norm(x, weight, *, silu: bool, fused: bool, out=None, eps: float = 1e-12,
             input_bias=None):  # fmt: skip
    """The Wan family's channel RMS norm(+SiLU): ``x / max(||x||_2 over dim 1, eps) *
    sqrt(C) * weight[c]``, of ``x + input_bias[c]`` when given (a producing conv's bias).
    Fused: one ``sdvae.kernels.rms_norm`` (written into ``out`` when given: a tensor of x's
    shape and strides, e.g. the frames of a causal conv's input buffer; the input bias added
    in its loads). Eager: the kernel's reference (``rms_norm_reference``: diffusers' own
    arithmetic, the normalization in fp32 for fp16/bf16 inputs), copied into ``out`` when
    given."""
    if fused:
        if x.is_meta:
            return out if out is not None else torch.empty_like(x)
        from . import kernels

        return kernels.rms_norm(x, weight, eps=eps, silu=silu, out=out, input_bias=input_bias)
    from .kernels.rms_norm import rms_norm_reference

    y = rms_norm_reference(x, weight, eps=eps, silu=silu, input_bias=input_bias)
    return y if out is None else out.copy_(y)


# -------------------------------------------------------------------------- attention
def attention(q, k, v, *, scale, fused: bool):
    """The attention core on (B, L, D) or (B, H, L, D): ``sdvae.kernels.attention`` (inputs
    made contiguous) or SDPA."""
    if q.is_meta:  # shape only: the output, and beside it what each holds inside itself
        o = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        n, lq = q.shape[0], q.shape[-2]
        heads = q.shape[1] if q.dim() == 4 else 1
        if fused:  # the logsumexp; on CUDA the library path's q copy and score chunks
            _spike(n * heads * lq * 4)
            _spike(q.nbytes + 2 * 2**24 * 4, "cuda")
        else:
            q4 = q if q.dim() == 4 else q.unsqueeze(1)
            _spike(sdpa_extra_bytes(_real(), tuple(q4.shape), k.shape[-2], q.dtype))
        return o
    if fused:
        from . import kernels

        return kernels.attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ------------------------------------------------------------------ the folded upsampler
#: Nearest-x2 upsampling followed by a 3-tap conv (padding 1), per output parity and tap:
#: output pixel 2i + p reads input taps i - 1, i, i + 1 of the upsampled row, which are input
#: pixels ``(2i + p - 1) // 2 .. (2i + p + 1) // 2``. Row a of this map says which 3x3 taps
#: land on tap a of a stride-2, padding-1, 4-tap transposed conv.
UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def fold_upsample_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (C_in, C_out, 4, 4) weight ``Wt`` with
    ``conv_transpose2d(x, Wt, b, stride=2, padding=1) == conv2d(interpolate(x, 2), W, b, 1)``
    for a (C_out, C_in, 3, 3) weight ``W``:
    ``Wt[i, o, a, b] = sum_uv M[a, u] M[b, v] W[o, i, u, v]`` with ``M = UPSAMPLE_TAPS``.
    Exact in real arithmetic: the taps that read the same input pixel are summed into one
    weight, so only the rounding differs. 2.25x fewer FLOPs and no 4x-sized upsampled copy.
    Folded in float64, returned in ``weight``'s dtype."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    w = weight.double()  # differentiable: under autograd the gradient reaches the 3x3 weight
    # Sums of slices, no tap matrix: nothing is copied from the host (a CUDA-graph capture
    # forbids that copy).
    rows = torch.stack([sum(w[:, :, u] for u in range(3) if t[u]) for t in UPSAMPLE_TAPS], 2)
    wt = torch.stack([sum(rows[..., v] for v in range(3) if t[v]) for t in UPSAMPLE_TAPS], 3)
    return wt.transpose(0, 1).contiguous().to(weight.dtype)


class _StorageRef:
    """A weak reference to a weight's storage. A fold is current only while the storage it was
    made from lives: once freed, its address may be reused by another weight with the same
    version, dtype and device (a cast there and back, accelerate's offload bringing weights
    per call). Copies and pickles are dead references (their owner refolds)."""

    __slots__ = ("ref",)

    def __init__(self, t: torch.Tensor | None = None):
        self.ref = None if t is None else weakref.ref(t.untyped_storage())

    def __call__(self):
        return None if self.ref is None else self.ref()

    def __reduce__(self):
        return (_StorageRef, ())


def tensors_key(tensors, *extra) -> tuple | None:
    """What ``tensors_unchanged`` compares: each tensor's live storage (weakly), address and
    version, plus ``extra`` (e.g. the dtype and device a result was made for). None when a
    tensor is an inference tensor (made under ``torch.inference_mode``), which has no version
    counter: what is made from it is then never reused."""
    if any(t.is_inference() for t in tensors):
        return None
    return (extra, tuple((_StorageRef(t), t.data_ptr(), t._version) for t in tensors))


def tensors_unchanged(key: tuple | None, tensors, *extra) -> bool:
    """Whether ``tensors`` are still the ones ``key`` was made from, unmodified: the same live
    storages (an address alone may be reused after a cast there and back), addresses and
    versions."""
    if key is None or any(t.is_inference() for t in tensors):
        return False
    made_extra, made = key
    return (
        made_extra == extra
        and len(made) == len(tensors)
        and all(
            not t.is_meta and ref() is t.untyped_storage() and (p, v) == (t.data_ptr(), t._version)
            for (ref, p, v), t in zip(made, tensors)
        )
    )


def derived(cache: dict, name, sources, dtype, device, make):
    """``make()``, a value computed from ``sources`` (weights, buffers) for ``dtype`` and
    ``device``, kept in ``cache[name]`` while the sources are unchanged (``tensors_unchanged``)
    so that later calls launch nothing and copy nothing from the host. Recomputed on every
    call under torch.compile or a CUDA-graph capture (a traced or captured call always reads
    the current values), when autograd must see it (a source requires grad, grad mode on),
    and for meta or inference sources (no version counter to tell a change)."""
    if (
        torch.compiler.is_compiling()
        or any(t.is_meta or t.is_inference() for t in sources)
        or capturing()
        or (torch.is_grad_enabled() and any(t.requires_grad for t in sources))
    ):
        return make()
    hit = cache.get(name)
    if hit is not None and tensors_unchanged(hit[0], sources, dtype, device):
        return hit[1]
    key = tensors_key(sources, dtype, device)
    # Plain tensors even when called under inference mode, so that a later call with
    # autograd on may read them.
    with torch.inference_mode(False), torch.no_grad():
        out = make()
    cache[name] = (key, out)
    return out


def fold_is_current(owner: torch.nn.Module, conv: torch.nn.Conv2d) -> bool:
    """Whether ``owner.folded_weight`` was folded from ``conv.weight`` as it is now: the same
    live storage, address, version, dtype and device."""
    key = getattr(owner, "_folded_from", None)
    w = conv.weight
    return (
        key is not None
        and getattr(owner, "folded_weight", None) is not None
        and tensors_unchanged(key, [w], w.dtype, w.device)
    )


def refold_upsample(owner: torch.nn.Module, conv: torch.nn.Conv2d) -> None:
    """(Re)compute ``owner.folded_weight`` from ``conv.weight``, in its dtype, device and
    memory format (channels_last when the conv weight is); in place when the tensor's layout
    allows, since a captured CUDA graph keeps reading it. It is a non-persistent buffer of
    sdvae's ``Upsample`` and a plain attribute of a diffusers ``Upsample2D`` (which
    accelerate's hooks then leave alone).

    Nothing is folded while ``conv.weight`` is on the meta device (a model built empty and
    loaded later with ``assign=True``, or offloaded by accelerate): a meta buffer would make
    the later ``.to(device)`` fail, so the fold waits for the first call on real weights."""
    if conv.weight.is_meta:
        return
    with torch.inference_mode(False), torch.no_grad():
        # A plain tensor even when the fold happens under inference mode, so that a later
        # in-place refold outside it (or inside a CUDA graph's call) is allowed.
        w = conv.weight
        wt = fold_upsample_weight(w)
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            wt = wt.contiguous(memory_format=torch.channels_last)
        old = getattr(owner, "folded_weight", None)
        same = (wt.shape, wt.stride(), wt.dtype, wt.device)
        if (
            old is not None
            and (old.shape, old.stride(), old.dtype, old.device) == same
            and (not old.is_inference())
        ):
            old.copy_(wt)
        else:
            owner.folded_weight = wt  # a buffer where one is registered, else an attribute
        owner._folded_from = tensors_key([w], w.dtype, w.device)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where CUDA never started)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def upsample(owner: torch.nn.Module, conv: torch.nn.Conv2d, x: torch.Tensor, *,
             bias: bool = True) -> torch.Tensor:  # fmt: skip
    """``conv(interpolate(x, 2, nearest))`` as one transposed conv with ``owner``'s folded
    weight, refolded first if ``conv.weight`` changed since (not under torch.compile, which
    traces the weights as they are; there a missing fold is computed in the graph);
    ``bias=False`` leaves ``conv.bias`` out. On meta weights (a shape-only call) the fold is
    computed for the call and not kept.

    Never refolded inside a CUDA-graph capture: the graph's caller refolds in place before
    capturing and before each replay (a fold made in the capture would live in the graph's
    pool). Inference-tensor weights are never "current" (no version counter). When autograd
    records (grad mode on, the 3x3 weight requires grad) the fold is made in the call, so
    that gradients reach that weight (the kept fold is made without autograd)."""
    if conv.weight.is_meta:  # shape only: the folded weight's shape (its values unused)
        c_out, c_in = conv.weight.shape[:2]
        w = torch.empty((c_in, c_out, 4, 4), dtype=conv.weight.dtype, device="meta")
    elif torch.is_grad_enabled() and conv.weight.requires_grad:
        w = fold_upsample_weight(conv.weight)
    else:
        now = capturing()
        if not now and not torch.compiler.is_compiling() and not fold_is_current(owner, conv):
            refold_upsample(owner, conv)
        w = getattr(owner, "folded_weight", None)
        if w is None or (now and (w.dtype, w.device) != (x.dtype, x.device)):
            w = fold_upsample_weight(conv.weight)
    w, b = cast_like(x, w, conv.bias if bias else None)
    return F.conv_transpose2d(x, w, b, stride=2, padding=1)


# ------------------------------------------------------------------ accelerate hooks
@contextlib.contextmanager
def weights_of(*modules):
    """Run the accelerate hook of each of ``modules`` that has one (``_hf_hook``) around a
    block that reads their weights without calling them: ``pre_forward`` brings offloaded
    weights to the execution device, ``post_forward`` offloads them again."""
    entered = []
    try:
        for m in modules:
            hook = getattr(m, "_hf_hook", None)
            if hook is not None:
                hook.pre_forward(m)
                entered.append(m)
        yield
    finally:
        for m in reversed(entered):
            m._hf_hook.post_forward(m, None)
