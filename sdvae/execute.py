"""The whole-tensor executor: an encoder or decoder lowered to steps (``sdvae.steps``), run
one whole tensor at a time with the fused kernels (``sdvae.dispatch``). This is the fast full
path of ``sdvae.optimize``; ``sdvae.stream`` runs the same steps band by band.

What it adds to running the steps one after another:

* **One reference at a time.** Activations travel in a one-element list (``state``) that a
  block empties before it works, so each tensor is freed as soon as its last reader ran.
* **In-place GroupNorms.** A GroupNorm writes its result over its input when nothing reads
  that input again (``dispatch.group_norm(inplace=True)``, inference only): norm2 over
  conv1's output; norm1 over the block's input when the 1x1 shortcut has read it already
  (``owned``); the closing norm over the last block's output.
* **Biases moved into the next op's loads.** conv1 runs without its bias, which norm2 adds
  in its loads (when norm2 is fused). In the decoder a fused upsampler's bias is handed on
  (``pending``) to the next level's first block when its norm1 is fused: it enters norm1's
  loads and the residual (through the 1x1 shortcut as ``W @ pending`` added to its bias,
  else into conv2's bias).
* **Residual in the epilogue.** conv2's bias and the residual go into conv2's cuDNN graph
  (``dispatch.conv2d(residual=...)``).
* **Attention.** GroupNorm, one C -> 3C projection, the fused attention core, and the
  output projection with bias and residual in one ``addmm`` (channels_last token views are
  free).

Memory: at the decoder's last level (256 -> 128 channels at 2048^2, 2 GiB per 256-channel
tensor in fp16) the in-place norm1 is the difference between five live tensors' worth and
four. The planner (``sdvae.budget``) runs this code on the meta device to measure the peak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .steps import Attention, Conv, ConvIn, Downsample, Lowered, Norm, Out, Resnet, Upsample

__all__ = ["run", "measure", "resnet", "attention", "upsample", "norm", "conv"]


def norm(st: Norm, x, *, silu: bool, input_bias=None, inplace: bool = False):
    return dispatch.group_norm(x, st.groups, st.weight, st.bias, st.eps, silu=silu,
                               fused=st.fused, input_bias=input_bias, inplace=inplace)  # fmt: skip


def conv(st: Conv, x, *, bias=True, residual=None):
    """A stride-1 conv record on ``x``; ``bias``: True (its own), False (none) or a tensor that
    replaces it for this call."""
    b = st.bias if bias is True else (None if bias is False else bias)
    return dispatch.conv2d(x, st.weight, b, fused=st.fused, padding=st.padding,
                           residual=residual)  # fmt: skip


def _bias_through_1x1(st: Conv, pending: torch.Tensor) -> torch.Tensor:
    """The bias of ``conv(x + pending[c])`` for a 1x1 conv: ``b + W @ pending``."""
    w = st.weight.reshape(st.weight.shape[0], -1)
    extra = torch.mv(w.float(), pending.float()).to(w.dtype)
    return extra if st.bias is None else st.bias + extra


def resnet(st: Resnet, state: list, pending=None, *, owned: bool) -> None:
    """The block on ``state = [x]``, replaced by ``[output]`` (see the module docstring):
    ``pending`` is an upsampler's bias not yet added to x; ``owned``: x is the model's own
    activation, read by no one after this block."""
    x = state.pop()
    fold = st.norm2.fused
    if st.shortcut is not None:
        sb = True if pending is None else _bias_through_1x1(st.shortcut, pending)
        res = conv(st.shortcut, x, bias=sb)
        h = norm(st.norm1, x, silu=True, input_bias=pending, inplace=owned)
        del x
    else:
        res = x
        del x
        h = norm(st.norm1, res, silu=True, input_bias=pending)
    h = conv(st.conv1, h, bias=not fold)
    h = norm(st.norm2, h, silu=True, input_bias=st.conv1.bias if fold else None, inplace=True)
    bias2 = True
    if st.shortcut is None and pending is not None:
        b2 = st.conv2.bias
        bias2 = pending if b2 is None else b2 + pending
    state.append(conv(st.conv2, h, residual=res, bias=bias2))


def attention(st: Attention, x: torch.Tensor) -> torch.Tensor:
    """The attention block on ``x`` (N, C, H, W): fused (see the module docstring), or the
    eager reference's ops (projections, SDPA, out-projection, residual)."""
    b, c, h, w = x.shape
    if not st.fused:
        t = norm(st.norm, x, silu=False).reshape(b, c, h * w).transpose(1, 2)  # (B, L, C)
        q, k, v = F.linear(t, st.wq, st.bq), F.linear(t, st.wk, st.bk), F.linear(t, st.wv, st.bv)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=st.scale
        ).squeeze(1)
        o = F.linear(o, st.wo, st.bo)
        return x + o.transpose(1, 2).reshape(b, c, h, w)
    t = norm(st.norm, x, silu=False).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, L, C)
    w_qkv = torch.cat([st.wq, st.wk, st.wv])
    b_qkv = torch.cat([st.bq, st.bk, st.bv])
    qkv = F.linear(t, w_qkv, b_qkv)  # (B, L, 3C)
    q, k, v = (u.contiguous() for u in qkv.split(c, dim=-1))
    o = dispatch.attention(q, k, v, scale=st.scale, fused=True)  # (B, L, C)
    res = x.permute(0, 2, 3, 1).reshape(b * h * w, c) + st.bo  # residual + bias
    y = torch.addmm(res, o.reshape(b * h * w, c), st.wo.t())  # (B*L, C)
    y = y.view(b, h, w, c).permute(0, 3, 1, 2)  # a channels_last view
    if x.is_contiguous(memory_format=torch.channels_last):
        return y
    return y.contiguous()  # x's layout, so that the convs after it keep theirs


def upsample(st: Upsample, x: torch.Tensor, *, defer_bias: bool = False):
    """Nearest x2 + 3x3 conv: the folded transposed conv where the model runs it, else the
    eager ops. ``defer_bias`` (folded only): ``(y without bias, bias)``, for a next block that
    adds the bias itself."""
    if st.fused:
        if x.is_meta:  # a shape-only run of meta records (the planner)
            b = None if defer_bias else st.bias
            y = F.conv_transpose2d(x, st.folded, b, stride=2, padding=1)
        else:
            y = dispatch.upsample(st.owner, st.conv, x, bias=not defer_bias)
        if defer_bias:
            b = st.bias
            return y, (b.to(y.dtype) if b is not None and b.dtype != y.dtype else b)
        return y
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), st.weight, st.bias,
                    1, 1)  # fmt: skip


def run(low: Lowered, x: torch.Tensor) -> torch.Tensor:
    """The lowered encoder or decoder on ``x``."""
    steps = low.steps
    state: list = []
    pending = None
    for i, st in enumerate(steps):
        if isinstance(st, ConvIn):
            state.append(conv(st.conv, x))
            del x
        elif isinstance(st, Resnet):
            resnet(st, state, pending, owned=True)
            pending = None
        elif isinstance(st, Attention):
            state.append(attention(st, state.pop()))
        elif isinstance(st, Upsample):
            # A fused upsampler hands its bias to the next block's first GroupNorm when that
            # GroupNorm is fused too (it adds the bias in its loads, at no extra pass).
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            if st.fused and isinstance(nxt, Resnet) and nxt.norm1.fused:
                y, pending = upsample(st, state.pop(), defer_bias=True)
                state.append(y)
                del y
            else:
                state.append(upsample(st, state.pop()))
        elif isinstance(st, Downsample):
            c = st.conv
            state.append(dispatch.pad_conv2d(state.pop(), c.weight, c.bias, fused=c.fused))
        elif isinstance(st, Out):
            h = norm(st.norm, state.pop(), silu=True, inplace=True)
            return conv(st.conv, h)
    raise ValueError("the steps end without an Out step")


def measure(low: Lowered, shape, dtype: torch.dtype, fmt: torch.memory_format, real) -> int:
    """Peak bytes of ``run`` on an input of ``shape`` (the input excluded, the output
    included) on the ``real`` device, measured by running this module's own code on the meta
    device with ``low`` lowered there (``sdvae.steps.lower(..., meta=True, banded=False)``):
    every tensor it holds at once, and what the fused ops hold inside themselves
    (``sdvae.dispatch.metered``)."""
    from .memtrack import TensorMemory

    x = torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
    with torch.no_grad(), TensorMemory("meta", collect=False) as tracker:
        with dispatch.metered(tracker, real):
            run(low, x)
    return tracker.peak
