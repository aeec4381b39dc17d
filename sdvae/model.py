"""The reference KL autoencoder (Stable Diffusion's VAE), one definition for every path.

Module and parameter names follow diffusers' ``AutoencoderKL`` so that a diffusers state dict
loads as it is and the CompVis/ldm names map onto it one to one (``sdvae.loading``).
The semantics are those of the seed design: an asymmetric zero pad (one column right, one row
bottom) before every stride-2 downsample conv, GroupNorm with eps 1e-6, single-head attention
with scale ``C**-0.5``, and the sampling step ``mean + exp(0.5*clamp(logvar, -30, 20))*noise``
followed by ``(z - shift) * scale``.

The fused kernels are a switch on these same modules (``fused`` attributes, set by
``sdvae.optimize``), never a second copy of the model. With every switch off (the default),
each forward is plain eager PyTorch. The sampling step's eager reference lives beside its
kernel (``sdvae.kernels.vae_sample.vae_sample_reference``) and is imported from there when the
model samples, so ``import sdvae`` does not import Triton and the unfused model runs without it.

FLUX.2 (``VAEConfig.flux2()``, diffusers' ``AutoencoderKLFlux2``): the same blocks, plus the
``bn`` BatchNorm whose running statistics normalize the 2x2-patchified latents the pipeline
feeds its transformer. ``encode``/``decode`` take and give those latents (``raw=True``: the
encoder's own). The normalization costs no pass of its own:

* encode: ``pixel_unshuffle`` the moments (mean channels stay before log-variance channels),
  then the sampling step with per-channel ``scale = 1/sqrt(var + eps)``, ``shift = mean``;
* decode: a 1x1 conv on unpatchified latents equals a block-diagonal 1x1 conv on patchified
  ones, so de-normalize + unpatchify + ``post_quant_conv`` is one 1x1 conv with the affine
  folded into its weight and bias, then ``pixel_shuffle``. Without a ``post_quant_conv`` there
  is no exact fold (``conv_in`` is 3x3 with zero padding, and after unpatchifying the affine
  depends on pixel parity), so the affine runs as one explicit pass (``addcmul``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig

__all__ = [
    "VAE",
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "AttentionBlock",
    "GroupNorm",
    "Conv2d",
    "Upsample",
    "fold_upsample_weight",
]


class GroupNorm(nn.GroupNorm):
    """GroupNorm, optionally followed by SiLU (``silu=True``); parameter names as nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, *, silu: bool):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.silu = silu
        self.fused = False

    def forward(
        self,
        x: torch.Tensor,
        input_bias: torch.Tensor | None = None,
        *,
        inplace: bool = False,
    ) -> torch.Tensor:
        """GroupNorm(+SiLU) of ``x + input_bias[c]`` (``input_bias``: the producing conv's
        bias, left out of that conv so that it is added here, inside the kernel's loads).
        ``inplace``: the fused kernel may write the result over ``x`` (the caller will not
        read ``x`` again); callers always use the returned tensor."""
        if self.fused:
            from . import kernels

            return kernels.group_norm(
                x,
                self.num_groups,
                self.weight,
                self.bias,
                self.eps,
                silu=self.silu,
                input_bias=input_bias,
                out=x if inplace and self._may_overwrite(x, input_bias) else None,
            )
        if input_bias is not None:
            x = x + input_bias.view(1, -1, *([1] * (x.dim() - 2)))
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def _may_overwrite(self, x: torch.Tensor, input_bias: torch.Tensor | None) -> bool:
        """In place only for inference: not under torch.compile (which plans memory itself)
        and not when autograd records the call (it may need x for the backward)."""
        if torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias, input_bias)
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and names) that can run through ``sdvae.ops.conv2d``
    (``fused``, set by ``sdvae.optimize``): one cuDNN graph with the bias and an optional
    residual fused into the conv's epilogue, no padded copy. ``bias=False`` leaves the bias
    out (the caller adds it elsewhere, e.g. inside the next GroupNorm's loads); ``bias`` may
    also be a tensor that replaces ``self.bias`` for this call (a bias folded from upstream)."""

    fused = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, *, bias=True
    ) -> torch.Tensor:
        b = self.bias if bias is True else (None if bias is False else bias)
        w = self.weight
        if w.dtype != x.dtype:  # under autocast, as autocast's own conv would
            w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
        if self.fused:
            from . import ops

            ph, pw = self.padding
            return ops.conv2d(
                x, w, b, stride=self.stride[0], padding=(pw, pw, ph, ph), residual=residual
            )
        y = F.conv2d(x, w, b, self.stride, self.padding)
        return y if residual is None else y + residual


def _bias_through_1x1(conv: nn.Conv2d, pending: torch.Tensor) -> torch.Tensor:
    """The bias of ``conv(x + pending[c])`` for a 1x1 conv: ``b + W @ pending``."""
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    extra = torch.mv(w.float(), pending.float()).to(w.dtype)
    return extra if conv.bias is None else conv.bias + extra


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (1x1 conv if C changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, pending_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The block of ``x + pending_bias[c]`` (``pending_bias``: the bias of the upsampler
        before it, folded in here instead of being added to its output; see ``run``).
        Unfused, this is the plain eager block."""
        if not self.norm2.fused and pending_bias is None:
            h = self.conv1(self.norm1(x))
            h = self.norm2(h)
            h = self.conv2(h)
            if self.conv_shortcut is not None:
                x = self.conv_shortcut(x)
            return x + h
        state = [x]
        del x
        self.run(state, pending_bias, owned=False)
        return state.pop()

    def run(self, state: list, pending_bias: torch.Tensor | None = None, *, owned: bool) -> None:
        """The fused block on ``state = [x]``, replaced by ``[output]``: the block holds the
        only reference it needs, so each activation is freed as soon as its last reader ran.

        * conv1 runs without its bias, which norm2 adds in its loads (when norm2 is fused);
          conv2's bias and the residual go into conv2's epilogue (one cuDNN graph when the
          convs are fused).
        * A pending bias (the upsampler's, see ``Decoder.forward``) enters norm1's loads and
          the residual: through the 1x1 shortcut as ``W @ pending`` added to its bias, else
          into conv2's bias.
        * Memory: norm2 writes over conv1's output; with ``owned`` (x is the model's own
          activation, read by no one after this block) and a shortcut, the shortcut runs
          first and norm1 then writes over x. At the decoder's last level (256 -> 128
          channels at 2048^2, 2 GiB per 256-channel tensor in fp16) that is the difference
          between five live tensors' worth and four."""
        x = state.pop()
        fold = self.norm2.fused
        if self.conv_shortcut is not None:
            sb = (
                True
                if pending_bias is None
                else _bias_through_1x1(self.conv_shortcut, pending_bias)
            )
            res = self.conv_shortcut(x, bias=sb)
            h = self.norm1(x, input_bias=pending_bias, inplace=owned)
            del x
        else:
            res = x
            del x
            h = self.norm1(res, input_bias=pending_bias)
        h = self.conv1(h, bias=not fold)
        h = self.norm2(h, input_bias=self.conv1.bias if fold else None, inplace=True)
        bias2 = True
        if self.conv_shortcut is None and pending_bias is not None:
            b2 = self.conv2.bias
            bias2 = pending_bias if b2 is None else b2 + pending_bias
        state.append(self.conv2(h, residual=res, bias=bias2))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W pixels, head dim = channels, residual add."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps, silu=False)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self._forward_fused(x)
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, L, C)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=c**-0.5
        ).squeeze(1)
        o = self.to_out[0](o)
        return x + o.transpose(1, 2).reshape(b, c, h, w)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """GN, one C->3C projection, fused attention, and out-projection + residual in one addmm.

        In channels_last the (B, L, C) token views of ``x`` and of the result are free."""
        from . import kernels

        b, c, h, w = x.shape
        t = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, L, C)
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        b_qkv = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.linear(t, w_qkv, b_qkv)  # (B, L, 3C)
        q, k, v = (u.contiguous() for u in qkv.split(c, dim=-1))
        o = kernels.attention(q, k, v, scale=c**-0.5)  # (B, L, C)
        out = self.to_out[0]
        res = x.permute(0, 2, 3, 1).reshape(b * h * w, c) + out.bias  # residual + bias
        y = torch.addmm(res, o.reshape(b * h * w, c), out.weight.t())  # (B*L, C)
        y = y.view(b, h, w, c).permute(0, 3, 1, 2)  # a channels_last view
        if x.is_contiguous(memory_format=torch.channels_last):
            return y
        return y.contiguous()  # x's layout, so that the convs after it keep theirs


class Downsample(nn.Module):
    """Zero pad one column right and one row bottom, then a 3x3 stride-2 conv."""

    padding = (0, 1, 0, 1)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from . import ops

            w, b = self.conv.weight, self.conv.bias
            if w.dtype != x.dtype:  # under autocast, as autocast's own conv would
                w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
            return ops.pad_conv2d(x, w, b, stride=2, padding=self.padding)
        return self.conv(F.pad(x, self.padding))


#: Nearest-x2 upsampling followed by a 3-tap conv (padding 1), per output parity and tap:
#: output pixel 2i + p reads input taps i - 1, i, i + 1 of the upsampled row, which are input
#: pixels ``(2i + p - 1) // 2 .. (2i + p + 1) // 2``. Row a of this map says which 3x3 taps
#: land on tap a of a stride-2, padding-1, 4-tap transposed conv.
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def fold_upsample_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (C_in, C_out, 4, 4) weight ``Wt`` with
    ``conv_transpose2d(x, Wt, b, stride=2, padding=1) == conv2d(interpolate(x, 2), W, b, 1)``
    for a (C_out, C_in, 3, 3) weight ``W``:
    ``Wt[i, o, a, b] = sum_uv M[a, u] M[b, v] W[o, i, u, v]`` with ``M = _UPSAMPLE_TAPS``.
    Exact in real arithmetic: the taps that read the same input pixel are summed into one
    weight, so only the rounding differs. 2.25x fewer FLOPs and no 4x-sized upsampled copy.
    Folded in float64, returned in ``weight``'s dtype."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    w = weight.detach().double()
    # Sums of slices, no tap matrix: nothing is copied from the host (a CUDA-graph capture
    # forbids that copy).
    rows = torch.stack([sum(w[:, :, u] for u in range(3) if t[u]) for t in _UPSAMPLE_TAPS], 2)
    wt = torch.stack([sum(rows[..., v] for v in range(3) if t[v]) for t in _UPSAMPLE_TAPS], 3)
    return wt.transpose(0, 1).to(weight.dtype)


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


def _tensors_key(tensors, *extra) -> tuple | None:
    """What ``_tensors_unchanged`` compares: each tensor's live storage (weakly), address and
    version, plus ``extra`` (e.g. the dtype and device a result was made for). None when a
    tensor is an inference tensor (made under ``torch.inference_mode``), which has no version
    counter: what is made from it is then never reused."""
    if any(t.is_inference() for t in tensors):
        return None
    return (extra, tuple((_StorageRef(t), t.data_ptr(), t._version) for t in tensors))


def _tensors_unchanged(key: tuple | None, tensors, *extra) -> bool:
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


def fold_is_current(owner: nn.Module, conv: nn.Conv2d) -> bool:
    """Whether ``owner.folded_weight`` was folded from ``conv.weight`` as it is now: the same
    live storage, address, version, dtype and device."""
    key = getattr(owner, "_folded_from", None)
    w = conv.weight
    return (
        key is not None
        and getattr(owner, "folded_weight", None) is not None
        and _tensors_unchanged(key, [w], w.dtype, w.device)
    )


def refold_upsample(owner: nn.Module, conv: nn.Conv2d) -> None:
    """(Re)compute ``owner.folded_weight`` from ``conv.weight``, in its dtype, device and
    memory format (channels_last when the conv weight is); in place when the tensor's layout
    allows, since a captured CUDA graph keeps reading it. It is a non-persistent buffer of
    ``Upsample`` and a plain attribute of a diffusers ``Upsample2D`` (which accelerate's hooks
    then leave alone).

    Nothing is folded while ``conv.weight`` is on the meta device (a model built empty and
    loaded later with ``assign=True``, or offloaded by accelerate): a meta buffer would make
    the later ``.to(device)`` fail, so the fold waits for the first call on real weights.
    Shared by ``Upsample`` and the diffusers patch."""
    if conv.weight.is_meta:
        return
    with torch.inference_mode(False), torch.no_grad():
        # A plain tensor even when the fold happens under inference mode, so that a later
        # in-place refold outside it (or inside a CUDA graph's call) is allowed.
        _refold_upsample(owner, conv)


def _refold_upsample(owner: nn.Module, conv: nn.Conv2d) -> None:
    w = conv.weight
    wt = fold_upsample_weight(w)
    if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        wt = wt.contiguous(memory_format=torch.channels_last)
    old = getattr(owner, "folded_weight", None)
    if (
        old is not None
        and (old.shape, old.stride(), old.dtype, old.device)
        == (
            wt.shape,
            wt.stride(),
            wt.dtype,
            wt.device,
        )
        and not old.is_inference()
    ):
        old.copy_(wt)
    else:
        owner.folded_weight = wt  # a buffer where one is registered, else a plain attribute
    owner._folded_from = _tensors_key([w], w.dtype, w.device)


def upsample_folded(
    owner: nn.Module, conv: nn.Conv2d, x: torch.Tensor, *, bias: bool = True
) -> torch.Tensor:
    """``conv(interpolate(x, 2, nearest))`` as one transposed conv with ``owner``'s folded
    weight, refolded first if ``conv.weight`` changed since (not under torch.compile, which
    traces the weights as they are; there a missing fold is computed in the graph);
    ``bias=False`` leaves ``conv.bias`` out. On meta weights (a shape-only call) the fold is
    computed for the call and not kept."""
    if conv.weight.is_meta:
        w = fold_upsample_weight(conv.weight)
    else:
        # Never refolded inside a CUDA-graph capture: the graph's caller refolds in place
        # before capturing and before each replay (a fold made in the capture would live in
        # the graph's pool, and the refold's host-to-device copy of the taps is forbidden
        # there). Inference-tensor weights are never "current" (no version counter).
        capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling() and not fold_is_current(owner, conv):
            refold_upsample(owner, conv)
        w = getattr(owner, "folded_weight", None)
        if w is None or (capturing and (w.dtype, w.device) != (x.dtype, x.device)):
            w = fold_upsample_weight(conv.weight)
    b = conv.bias if bias else None
    if w.dtype != x.dtype:  # under autocast, as autocast's own conv would
        w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
    return F.conv_transpose2d(x, w, b, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv.

    Fused (``sdvae.optimize``): one stride-2 transposed conv with the folded 4x4 weight
    (``fold_upsample_weight``), kept in the non-persistent buffer ``folded_weight`` (not in the
    state dict) and refolded (in place when it can) if ``conv.weight`` was changed in place,
    replaced, moved or cast since. Never folded while the weights are on the meta device
    (``refold_upsample``): a model built empty and loaded with ``assign=True`` folds at its
    first call."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fused = False
        self.register_buffer("folded_weight", None, persistent=False)
        self._folded_from: tuple | None = None

    def fold(self) -> None:
        refold_upsample(self, self.conv)

    def forward(self, x: torch.Tensor, *, defer_bias: bool = False):
        """The upsampled tensor; with ``defer_bias`` (fused only) ``(y without bias, bias)``,
        for a next block that adds the bias itself (``ResnetBlock(pending_bias=...)``)."""
        if self.fused:
            y = upsample_folded(self, self.conv, x, bias=not defer_bias)
            if defer_bias:
                b = self.conv.bias
                return y, (b.to(y.dtype) if b is not None and b.dtype != y.dtype else b)
            return y
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, then an optional resampler."""

    def __init__(self, resnets: list[nn.Module], sampler: nn.Module | None, sampler_name: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.sampler_name = sampler_name
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))
        else:
            setattr(self, sampler_name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        sampler = getattr(self, self.sampler_name)
        return x if sampler is None else sampler[0](x)

    def run(
        self, state: list, pending_bias: torch.Tensor | None = None, *, defer_bias: bool = False
    ) -> torch.Tensor | None:
        """``forward`` on ``state = [x]`` (see ``ResnetBlock.run``). In the decoder
        (``Decoder.forward``) a fused upsampler's bias can be handed on instead of added
        (``defer_bias``): it is returned, and the next level takes it as ``pending_bias``;
        else None is returned."""
        for i, block in enumerate(self.resnets):
            block.run(state, pending_bias if i == 0 else None, owned=True)
        sampler = getattr(self, self.sampler_name)
        if sampler is None:
            return None
        x = state.pop()
        if defer_bias:
            x, bias = sampler[0](x, defer_bias=True)
            state.append(x)
            return bias
        state.append(sampler[0](x))
        return None


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(channels, channels, groups, eps),
                ResnetBlock(channels, channels, groups, eps),
            ]
        )
        self.attentions = (
            nn.ModuleList([AttentionBlock(channels, groups, eps)]) if attention else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)

    def run(self, state: list) -> None:
        """``forward`` on ``state = [x]`` (see ``ResnetBlock.run``)."""
        self.resnets[0].run(state, owned=True)
        if self.attentions is not None:
            state.append(self.attentions[0](state.pop()))
        self.resnets[1].run(state, owned=True)


def _fused_run(part) -> bool:
    """Whether ``part`` (Encoder/Decoder) runs its blocks through ``run``: the fused path,
    where activations are freed early and GroupNorms write in place."""
    return part.conv_norm_out.fused


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        levels = []
        out_c = ch[0]
        for i, c in enumerate(ch):
            in_c, out_c = out_c, c
            resnets = [
                ResnetBlock(in_c if j == 0 else out_c, out_c, g, eps)
                for j in range(cfg.layers_per_block)
            ]
            down = Downsample(out_c) if i < len(ch) - 1 else None
            levels.append(_Level(resnets, down, "downsamplers"))
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(ch[-1], g, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps, silu=True)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused_run(self):
            state = [self.conv_in(x)]
            del x
            for level in self.down_blocks:
                level.run(state)
            self.mid_block.run(state)
            return self.conv_out(self.conv_norm_out(state.pop(), inplace=True))
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        ch = tuple(reversed(cfg.decoder_block_out_channels or cfg.block_out_channels))
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, eps, cfg.mid_block_add_attention)
        levels = []
        out_c = ch[0]
        for i, c in enumerate(ch):
            in_c, out_c = out_c, c
            resnets = [
                ResnetBlock(in_c if j == 0 else out_c, out_c, g, eps)
                for j in range(cfg.layers_per_block + 1)
            ]
            up = Upsample(out_c) if i < len(ch) - 1 else None
            levels.append(_Level(resnets, up, "upsamplers"))
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps, silu=True)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not _fused_run(self):
            x = self.mid_block(self.conv_in(z))
            for level in self.up_blocks:
                x = level(x)
            return self.conv_out(self.conv_norm_out(x))
        state = [self.conv_in(z)]
        self.mid_block.run(state)
        pending = None
        levels = list(self.up_blocks)
        for level, after in zip(levels, levels[1:] + [None]):
            # A fused upsampler hands its bias to the next level's first GroupNorm when that
            # GroupNorm is fused too (it adds the bias in its loads, at no extra pass).
            defer = (
                after is not None
                and isinstance(level.upsamplers[0], Upsample)
                and level.upsamplers[0].fused
                and after.resnets[0].norm1.fused
            )
            pending = level.run(state, pending, defer_bias=defer)
        return self.conv_out(self.conv_norm_out(state.pop(), inplace=True))


class VAE(nn.Module):
    """Stable Diffusion's KL autoencoder (and FLUX.2's, ``VAEConfig.flux2()``).

    ``encode(images)`` maps images in [-1, 1], (N, 3, H, W), to the latents a pipeline feeds
    its denoiser: scaled latents (N, latent_channels, H/8, W/8) for the SD configs (each
    downsampling level floors odd sides), FLUX.2's 2x2-patchified, BatchNorm-normalized
    latents (N, 4 * latent_channels, H/16, W/16); ``decode(latents)`` maps them back to
    images. ``raw=True`` on either gives or takes the encoder's own latents instead (what
    diffusers' ``vae.encode(x).latent_dist`` gives and ``vae.decode`` takes);
    ``normalize_latents`` / ``denormalize_latents`` convert between the two. Both run under
    ``torch.no_grad()`` unless grad is enabled by the caller.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        if config is None:
            config = VAEConfig()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a sdvae.VAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c2 = 2 * config.latent_channels
        self.quant_conv = Conv2d(c2, c2, 1) if config.use_quant_conv else None
        lc = config.latent_channels
        self.post_quant_conv = Conv2d(lc, lc, 1) if config.use_post_quant_conv else None
        #: FLUX.2: the BatchNorm over 2x2-patchified latents, as diffusers' (only its running
        #: statistics are used, to normalize the latents; never run as a layer).
        self.bn = (
            nn.BatchNorm2d(
                config.pipeline_latent_channels,
                eps=config.batch_norm_eps,
                momentum=config.batch_norm_momentum,
                affine=False,
                track_running_stats=True,
            )
            if config.is_flux2
            else None
        )
        self._norm_cache: dict = {}  # FLUX.2's folded normalization, see _norm_folded
        self.fused_sampling = False
        self._graphs: dict | None = None  # sdvae.optimize(cuda_graph=True): sdvae.graphs
        #: Set by ``sdvae.optimize`` on CUDA: inputs are brought to this format first (one
        #: small copy of the images or latents) so that every layer runs in it.
        self.memory_format: torch.memory_format | None = None

    # ------------------------------------------------------------ CUDA graphs
    def enable_cuda_graphs(self) -> None:
        """Replay ``moments`` (the encoder) and the decoder from CUDA graphs, one per input
        shape (``sdvae.graphs``); ``sdvae.optimize(vae, cuda_graph=True)`` calls this."""
        self._graphs = {}

    def disable_cuda_graphs(self) -> None:
        self._graphs = None

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    def _prepare(self, x: torch.Tensor) -> None:
        """Before a graphed call (``sdvae.graphs``): refold what changed, in place."""
        for m in self.modules():
            if isinstance(m, Upsample) and m.fused and not fold_is_current(m, m.conv):
                m.fold()

    def _prepare_decode(self, latents: torch.Tensor) -> None:
        """``_prepare``, and FLUX.2's folded normalization made here on the caller's stream,
        not first during the warm-up on the graph's side stream."""
        self._prepare(latents)
        if self.config.is_flux2:
            self._norm_folded("decode", latents)

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting reallocates every weight: captured graphs would read freed memory.
        if self._graphs:
            self._graphs = {}
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # Captured graphs belong to this model's memory: a copy (deepcopy, pickle) keeps the
        # switch and captures its own.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        if state.get("_graphs"):
            state["_graphs"] = {}
        return state

    def _graphed(self, name: str, x: torch.Tensor):
        """The graph runner for ``name`` when this call may be replayed from a graph."""
        from .graphs import GraphedCall, autocast_on, hook_reasons, tensor_addresses

        if self._graphs is None or not x.is_cuda or torch.compiler.is_compiling():
            return None
        if autocast_on():
            return None
        hooked = hook_reasons(self)
        if hooked:  # hooks added after sdvae.optimize: eager, saying why
            self._graphs = {}
            getattr(self, "fused_reasons", {})["cuda_graph"] = hooked
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return None
        runner = self._graphs.get(name)
        if runner is None:
            fn = {
                "moments": self._moments,
                "decode": self._decode,
                "decode_raw": self._decode_raw,
            }[name]
            runner = GraphedCall(
                fn,
                prepare=self._prepare_decode if name == "decode" else self._prepare,
                addresses=lambda: tensor_addresses(self),
                memory_format=self.memory_format,
            )
            self._graphs[name] = runner
        return runner

    # -------------------------------------------------------------- checks
    def _check_input(self, name: str, x: torch.Tensor, channels: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(
                f"{name} must have {channels} channels (dim 1), got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
        p = self.encoder.conv_in.weight
        if x.dtype != p.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the model's weights are {p.dtype}; "
                f"convert one of them (e.g. vae.to({x.dtype}))"
            )
        if x.device != p.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {p.device}")

    # ------------------------------------------------------------- encode
    def moments(self, images: torch.Tensor, *, max_memory=None, offload=None) -> torch.Tensor:
        """The encoder's (N, 2*latent_channels, h, w) output: mean channels, then log-variance.
        ``max_memory`` / ``offload``: see ``encode``."""
        self._check_input("images", images, self.config.in_channels)
        from .stream import check_encoder_input

        check_encoder_input(*images.shape[2:], len(self.config.block_out_channels) - 1)
        if max_memory is not None or offload is not None:
            from . import budget

            return budget.moments(self, images, max_memory=max_memory, offload=offload)
        graphed = self._graphed("moments", images)
        return graphed(images) if graphed is not None else self._moments(images)

    def _moments(self, images: torch.Tensor, encoder=None) -> torch.Tensor:
        if self.memory_format is not None:
            images = images.contiguous(memory_format=self.memory_format)
        m = (encoder or self.encoder)(images)
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return m

    def encode(
        self,
        images: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        sample: bool = True,
        seed: int | None = None,
        raw: bool = False,
        max_memory=None,
        offload=None,
    ) -> torch.Tensor:
        """Images -> the pipeline's latents: ``(z - shift_factor) * scaling_factor`` for the SD
        configs; for FLUX.2, ``z`` 2x2-patchified and normalized per channel by the
        BatchNorm's running statistics, what ``Flux2Pipeline._encode_vae_image`` feeds the
        transformer (its image sides must then be multiples of ``config.image_factor``, 16).
        ``raw=True`` returns ``z`` itself, as diffusers' ``latent_dist`` gives it.

        ``sample=False`` returns the distribution's mode (the mean). Otherwise ``noise``
        (standard normal, the shape of the returned latents) is used when given; else noise
        is drawn from a generator seeded with ``seed``, or from torch's default generator when
        ``seed`` is None.

        The same ``seed`` reproduces the same latents on the same path; the fused path
        (``sdvae.optimize``) draws its noise inside the kernel (Philox), so its latents for a
        seed differ from the unfused model's (same distribution, other draws).

        ``max_memory`` (bytes, or a string such as ``"6GiB"``) bounds the call's peak memory:
        the usual path runs when it fits, else the exact streamed one (``sdvae.stream``: the
        same result, layer by layer over row bands); a budget that nothing meets raises
        ``ValueError`` naming the smallest that works. ``offload="cpu"`` keeps the streamed
        path's stored activations in pinned host memory (with ``max_memory=None``: within the
        device's free memory). ``memory_plan`` tells the estimate and the plan beforehand.
        """
        if noise is not None and seed is not None:
            raise ValueError("give either noise or seed, not both")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not isinstance(raw, bool):
            raise TypeError(f"raw must be a bool, got {type(raw).__name__}")
        if self.config.is_flux2 and not raw and isinstance(images, torch.Tensor):
            if images.dim() == 4:  # odd latents: refused before the encoder runs
                self.latent_shape(*images.shape[2:])
        moments = self.moments(images, max_memory=max_memory, offload=offload)
        return self._latents_from_moments(moments, noise, sample=sample, seed=seed, raw=raw)

    def _latents_from_moments(
        self, moments: torch.Tensor, noise, *, sample: bool, seed: int | None, raw: bool
    ) -> torch.Tensor:
        """The sampling step (and, for FLUX.2, the patchify + normalization folded into it)
        on the encoder's moments; ``encode`` without the encoder."""
        from .kernels.vae_sample import vae_sample_reference

        cfg = self.config
        scale, shift = (1.0, 0.0) if raw else (cfg.scaling_factor, cfg.shift_factor)
        if cfg.is_flux2 and not raw:
            # Mean channels stay before log-variance channels: channel k of the moments
            # becomes channels 4k .. 4k+3, and the first 2C of 4C * 2 are the means.
            moments = F.pixel_unshuffle(moments, 2)
            shift, inv_std = self._norm_folded("encode", moments)
            scale = inv_std
        lat_shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
        if noise is not None:
            if not sample:
                raise ValueError("noise was given but sample=False uses no noise")
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
            if tuple(noise.shape) != lat_shape:
                raise ValueError(
                    f"noise must have the latents' shape {lat_shape}, got {tuple(noise.shape)}"
                )
            if noise.device != moments.device:
                raise ValueError(f"noise is on {noise.device} but images are on {moments.device}")
            if not noise.is_floating_point():
                raise TypeError(f"noise must be a floating tensor, got {noise.dtype}")
            noise = noise.to(moments.dtype)
        if self.fused_sampling:
            from . import kernels

            return kernels.vae_sample(
                moments, noise, scaling_factor=scale, shift_factor=shift, seed=seed, sample=sample
            )
        if sample and noise is None:
            gen = None
            if seed is not None:
                gen = torch.Generator(device=moments.device).manual_seed(seed)
            noise = torch.randn(
                lat_shape, generator=gen, device=moments.device, dtype=moments.dtype
            )
        return vae_sample_reference(
            moments, noise, scaling_factor=scale, shift_factor=shift, sample=sample
        )

    # ------------------------------------------------------------- decode
    def decode(
        self,
        latents: torch.Tensor,
        *,
        raw: bool = False,
        max_memory=None,
        offload=None,
    ) -> torch.Tensor:
        """The pipeline's latents (what ``encode`` returns) -> images (nominally in [-1, 1];
        not clamped). ``raw=True`` takes the encoder's own latents instead, as diffusers'
        ``vae.decode`` does. ``max_memory`` / ``offload``: see ``encode``.

        Never modifies ``latents``."""
        if not isinstance(raw, bool):
            raise TypeError(f"raw must be a bool, got {type(raw).__name__}")
        cfg = self.config
        channels = cfg.latent_channels if raw else cfg.pipeline_latent_channels
        self._check_input("latents", latents, channels)
        if max_memory is not None or offload is not None:
            from . import budget

            return budget.decode(self, latents, max_memory=max_memory, offload=offload, raw=raw)
        name = "decode_raw" if raw else "decode"
        graphed = self._graphed(name, latents)
        if graphed is not None:
            return graphed(latents)
        return self._decode_raw(latents) if raw else self._decode(latents)

    def memory_plan(self, shape, *, op: str = "decode", dtype=None, device=None,
                    max_memory=None, offload=None, raw: bool = False):  # fmt: skip
        """The estimated peak memory and the plan ``decode`` (``op="decode"``, ``shape`` of the
        latents, the pipeline's or with ``raw=True`` the raw ones) or ``encode``
        (``op="encode"``, ``shape`` of the images) would use within ``max_memory``
        (``sdvae.budget.MemoryPlan``; ``.describe()`` prints it). ``dtype`` and ``device``
        default to the model's."""
        from . import budget

        return budget.vae_plan(self, op, shape, dtype=dtype, device=device,
                               max_memory=max_memory, offload=offload, raw=raw)  # fmt: skip

    def _decode(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        if self.memory_format is not None:
            latents = latents.contiguous(memory_format=self.memory_format)
        return (decoder or self.decoder)(self._decoder_input(latents))

    def _decode_raw(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        if self.memory_format is not None:
            latents = latents.contiguous(memory_format=self.memory_format)
        return (decoder or self.decoder)(self._decoder_input(latents, raw=True))

    def _decoder_input(self, latents: torch.Tensor, *, raw: bool = False) -> torch.Tensor:
        """What the decoder's ``conv_in`` reads: the latents de-scaled (SD) or de-normalized
        and unpatchified (FLUX.2, folded into ``post_quant_conv``), through
        ``post_quant_conv``."""
        cfg = self.config
        pqc = self.post_quant_conv
        if raw or not cfg.is_flux2:
            z = latents if raw else latents / cfg.scaling_factor + cfg.shift_factor
            return pqc(z) if pqc is not None else z
        if pqc is None:
            # No exact fold into conv_in (3x3, zero-padded, reads unpatchified pixels whose
            # affine depends on their parity): one explicit pass, in patchified space.
            mean, std = self._norm_folded("decode", latents)
            z = torch.addcmul(mean.view(1, -1, 1, 1), latents, std.view(1, -1, 1, 1))
        else:
            w, b = self._norm_folded("decode", latents)
            if pqc.fused:
                from . import ops

                z = ops.conv2d(latents, w, b, stride=1, padding=(0, 0, 0, 0))
            else:
                z = F.conv2d(latents, w, b)
        z = F.pixel_shuffle(z, 2)
        if self.memory_format is not None:
            z = z.contiguous(memory_format=self.memory_format)
        return z

    # ------------------------------------------------ FLUX.2 latent normalization
    def latent_shape(self, height: int, width: int, *, raw: bool = False) -> tuple[int, int, int]:
        """(C, h, w) of the latents ``encode`` returns for one ``height`` x ``width`` image
        (each downsampling level floors an odd side). FLUX.2 latents are 2x2 patches: an odd
        raw latent side is refused (ValueError naming the images)."""
        cfg = self.config
        h, w = int(height), int(width)
        for _ in range(len(cfg.block_out_channels) - 1):
            h, w = h // 2, w // 2
        if raw or not cfg.is_flux2:
            return (cfg.latent_channels, h, w)
        if h % 2 or w % 2:
            f = cfg.image_factor
            raise ValueError(
                f"images of {height}x{width} (HxW) give FLUX.2 raw latents of {h}x{w}, which "
                f"2x2 patches cannot tile: give images whose sides are multiples of {f} "
                "(or encode with raw=True)"
            )
        return (cfg.pipeline_latent_channels, h // 2, w // 2)

    def _bn_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.2: (mean, sqrt(var + eps)) per patchified channel in ``dtype`` (the square root
        taken in the buffers' dtype, as ``Flux2Pipeline`` does)."""
        bn = self.bn
        mean = bn.running_mean.detach().to(dtype)
        # as the pipeline: sqrt(var + eps) in the buffers' dtype, then cast
        std = torch.sqrt(bn.running_var.detach() + self.config.batch_norm_eps).to(dtype)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (``encode(..., raw=True)``) -> the pipeline's latents, unfolded, op by
        op in ``z``'s dtype: ``(z - shift) * scale`` (SD configs); for FLUX.2 a 2x2 patchify
        (channel ``c*4 + 2*di + dj``, as ``Flux2Pipeline._patchify_latents`` and
        ``F.pixel_unshuffle``) and ``(x - running_mean) / sqrt(running_var + eps)``."""
        cfg = self.config
        if not cfg.is_flux2:
            return (z - cfg.shift_factor) * cfg.scaling_factor
        self._check_latents_4d("z", z, cfg.latent_channels)
        if z.shape[2] % 2 or z.shape[3] % 2:
            raise ValueError(f"z: 2x2 patches need even sides, got shape {tuple(z.shape)}")
        x = F.pixel_unshuffle(z, 2)
        mean, std = self._bn_stats(z.dtype)
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``normalize_latents``, unfolded: the pipeline's latents -> raw ones
        (FLUX.2: ``x * sqrt(running_var + eps) + running_mean``, then unpatchify)."""
        cfg = self.config
        if not cfg.is_flux2:
            return latents / cfg.scaling_factor + cfg.shift_factor
        self._check_latents_4d("latents", latents, cfg.pipeline_latent_channels)
        mean, std = self._bn_stats(latents.dtype)
        return F.pixel_shuffle(latents * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1), 2)

    @staticmethod
    def _check_latents_4d(name: str, x, channels: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (N, {channels}, h, w), got {tuple(x.shape)}")

    def _norm_folded(self, which: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.2's normalization, folded (computed in float64 from the current buffers):

        * ``"encode"``: (shift, scale) = (running_mean, 1/sqrt(running_var + eps)), (4C,)
          tensors for ``vae_sample`` on the patchified moments;
        * ``"decode"`` with ``post_quant_conv``: its 1x1 weight and bias on patchified latents,
          ``W' = kron(W, I4) * std[None, :]`` and ``b' = repeat(b, 4) + kron(W, I4) @ mean``;
          without it, (mean, std) for the explicit pass.

        Kept while the weights and statistics are unchanged (same live storages, addresses and
        versions: ``_tensors_unchanged``);
        recomputed every call under torch.compile or CUDA-graph capture, so that a traced or
        captured call always reads the current values, when autograd must see the fold
        (``post_quant_conv``'s weights require grad), and for inference tensors (no version
        counter to tell a change)."""
        pqc = self.post_quant_conv if which == "decode" else None
        sources = [self.bn.running_mean, self.bn.running_var]
        if pqc is not None:
            sources += [pqc.weight] + ([pqc.bias] if pqc.bias is not None else [])
        # The encode factors stay in float64 for a float64 model, else fp32 (the kernel reads
        # fp32); the decode fold is cast to the latents' dtype, as a conv's weight would be.
        dtype = x.dtype if which == "decode" else torch.promote_types(x.dtype, torch.float32)
        if (
            torch.compiler.is_compiling()
            or any(t.is_meta or t.is_inference() for t in sources)
            or (x.is_cuda and torch.cuda.is_current_stream_capturing())
            or (torch.is_grad_enabled() and any(t.requires_grad for t in sources))
        ):
            return self._fold_norm(which, pqc, x.device, dtype)
        hit = self._norm_cache.get(which)
        if hit is not None and _tensors_unchanged(hit[0], sources, dtype, x.device):
            return hit[1]
        key = _tensors_key(sources, dtype, x.device)
        # Plain tensors even when called under inference mode, so that a later call with
        # autograd on may read them.
        with torch.inference_mode(False), torch.no_grad():
            out = self._fold_norm(which, pqc, x.device, dtype)
        self._norm_cache[which] = (key, out)
        return out

    def _fold_norm(self, which: str, pqc, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``_norm_folded``: the folded tensors, computed in float64."""
        mean, std = self._bn_stats(torch.float64)
        if which == "encode":
            out = (mean, 1.0 / std)
        elif pqc is None:
            out = (mean, std)
        else:
            c, p2 = self.config.latent_channels, self.config.patch_size**2
            eye = torch.eye(p2, dtype=torch.float64, device=mean.device)
            w = torch.kron(pqc.weight.double().reshape(c, c), eye)  # (4C, 4C), block-diagonal
            b = torch.zeros(c, dtype=torch.float64, device=mean.device)
            if pqc.bias is not None:
                b = pqc.bias.double()
            w_folded = (w * std[None, :]).reshape(c * p2, c * p2, 1, 1)
            out = (w_folded, b.repeat_interleave(p2) + w @ mean)
        return tuple(t.to(device=device, dtype=dtype) for t in out)

    def forward(self, images: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Encode then decode (the reconstruction)."""
        return self.decode(self.encode(images, sample=sample))
