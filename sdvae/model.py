"""The reference KL autoencoder (Stable Diffusion's VAE), one definition for every path.

Module and parameter names follow diffusers' ``AutoencoderKL`` so that a diffusers state dict
loads as it is and the CompVis/ldm names map onto it one to one (``sdvae.loading``).
The semantics are those of the seed design: an asymmetric zero pad (one column right, one row
bottom) before every stride-2 downsample conv, GroupNorm with eps 1e-6, single-head attention
with scale ``C**-0.5``, and the sampling step ``mean + exp(0.5*clamp(logvar, -30, 20))*noise``
followed by ``(z - shift) * scale``.

The fused kernels are a switch on these same modules (``fused`` attributes, set by
``sdvae.optimize``), never a second copy of the model. With every switch off (the default),
each forward is plain eager PyTorch.
"""

from __future__ import annotations

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

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


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
    m = torch.tensor(_UPSAMPLE_TAPS, dtype=torch.float64, device=weight.device)
    wt = torch.einsum("au,bv,oiuv->ioab", m, m, weight.detach().double())
    return wt.to(weight.dtype)


def _conv_weight_key(conv: nn.Conv2d) -> tuple:
    w = conv.weight
    return (w.data_ptr(), w._version, w.dtype, w.device)


def refold_upsample(owner: nn.Module, conv: nn.Conv2d) -> None:
    """(Re)compute ``owner.folded_weight`` (a non-persistent buffer) from ``conv.weight``, in
    its dtype, device and memory format (channels_last when the conv weight is); in place
    when the buffer's layout allows, since a captured CUDA graph keeps reading that buffer.
    Shared by ``Upsample`` and the diffusers patch."""
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
    elif "folded_weight" in owner._buffers:
        owner.folded_weight = wt
    else:
        owner.register_buffer("folded_weight", wt, persistent=False)
    owner._folded_from = _conv_weight_key(conv)


def upsample_folded(
    owner: nn.Module, conv: nn.Conv2d, x: torch.Tensor, *, bias: bool = True
) -> torch.Tensor:
    """``conv(interpolate(x, 2, nearest))`` as one transposed conv with ``owner``'s folded
    weight, refolded first if ``conv.weight`` changed since (not under torch.compile, which
    traces the weights as they are); ``bias=False`` leaves ``conv.bias`` out."""
    if not torch.compiler.is_compiling() and (
        getattr(owner, "folded_weight", None) is None
        or owner._folded_from != _conv_weight_key(conv)
    ):
        refold_upsample(owner, conv)
    w, b = owner.folded_weight, (conv.bias if bias else None)
    if w.dtype != x.dtype:  # under autocast, as autocast's own conv would
        w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
    return F.conv_transpose2d(x, w, b, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv.

    Fused (``sdvae.optimize``): one stride-2 transposed conv with the folded 4x4 weight
    (``fold_upsample_weight``), kept in the non-persistent buffer ``folded_weight`` (not in the
    state dict) and refolded (in place when it can) if ``conv.weight`` was changed in place
    or replaced since."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fused = False
        self.register_buffer("folded_weight", None, persistent=False)
        self._folded_from: tuple | None = None

    def _weight_key(self) -> tuple:
        return _conv_weight_key(self.conv)

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
        ch, g, eps = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.norm_eps
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


def sample_reference(
    moments: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    scaling_factor: float,
    shift_factor: float,
    sample: bool,
) -> torch.Tensor:
    """The seed's sampling step, op by op: chunk, clamp, exp, multiply-add, shift, scale."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    if sample:
        logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        std = torch.exp(0.5 * logvar)
        z = mean + std * noise
    else:
        z = mean
    return (z - shift_factor) * scaling_factor


class VAE(nn.Module):
    """Stable Diffusion's KL autoencoder.

    ``encode(images)`` maps images in [-1, 1], (N, 3, H, W), to scaled latents
    (N, latent_channels, ceil(H/8), ceil(W/8)) for the SD configs; ``decode(latents)`` maps
    scaled latents back to images. Both run under ``torch.no_grad()`` unless grad is enabled
    by the caller.
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

    def _refresh_folds(self) -> None:
        for m in self.modules():
            if isinstance(m, Upsample) and m.fused and m.folded_weight is not None:
                if m._folded_from != m._weight_key():
                    m.fold()

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
        from .graphs import GraphedCall, autocast_on

        if self._graphs is None or not x.is_cuda or torch.compiler.is_compiling():
            return None
        if autocast_on():
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return None
        runner = self._graphs.get(name)
        if runner is None:
            fn = self._moments if name == "moments" else self._decode
            runner = GraphedCall(
                fn, before_replay=self._refresh_folds, memory_format=self.memory_format
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
        max_memory=None,
        offload=None,
    ) -> torch.Tensor:
        """Images -> scaled latents ``(z - shift_factor) * scaling_factor``.

        ``sample=False`` returns the scaled mean (the distribution's mode). Otherwise ``noise``
        (standard normal, shape of the latents) is used when given; else noise is drawn from a
        generator seeded with ``seed``, or from torch's default generator when ``seed`` is None.

        The same ``seed`` reproduces the same latents on the same path; the fused path
        (``sdvae.optimize``) draws its noise inside the kernel (Philox), so its latents for a
        seed differ from the unfused model's (same distribution, other draws).
        """
        if noise is not None and seed is not None:
            raise ValueError("give either noise or seed, not both")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        moments = self.moments(images, max_memory=max_memory, offload=offload)
        cfg = self.config
        lat_shape = (moments.shape[0], cfg.latent_channels, *moments.shape[2:])
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
                moments,
                noise,
                scaling_factor=cfg.scaling_factor,
                shift_factor=cfg.shift_factor,
                seed=seed,
                sample=sample,
            )
        if sample and noise is None:
            gen = None
            if seed is not None:
                gen = torch.Generator(device=moments.device).manual_seed(seed)
            noise = torch.randn(
                lat_shape, generator=gen, device=moments.device, dtype=moments.dtype
            )
        return sample_reference(
            moments,
            noise,
            scaling_factor=cfg.scaling_factor,
            shift_factor=cfg.shift_factor,
            sample=sample,
        )

    # ------------------------------------------------------------- decode
    def decode(self, latents: torch.Tensor, *, max_memory=None, offload=None) -> torch.Tensor:
        """Scaled latents -> images (nominally in [-1, 1]; not clamped).

        Never modifies ``latents``. ``max_memory`` / ``offload``: see ``encode``."""
        self._check_input("latents", latents, self.config.latent_channels)
        if max_memory is not None or offload is not None:
            from . import budget

            return budget.decode(self, latents, max_memory=max_memory, offload=offload)
        graphed = self._graphed("decode", latents)
        return graphed(latents) if graphed is not None else self._decode(latents)

    def memory_plan(self, shape, *, op: str = "decode", dtype=None, device=None,
                    max_memory=None, offload=None):  # fmt: skip
        """The estimated peak memory and the plan ``decode`` (``op="decode"``, ``shape`` of the
        latents) or ``encode`` (``op="encode"``, ``shape`` of the images) would use within
        ``max_memory`` (``sdvae.budget.MemoryPlan``; ``.describe()`` prints it). ``dtype`` and
        ``device`` default to the model's."""
        from . import budget

        return budget.vae_plan(self, op, shape, dtype=dtype, device=device,
                               max_memory=max_memory, offload=offload)  # fmt: skip

    def _decode(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        if self.memory_format is not None:
            latents = latents.contiguous(memory_format=self.memory_format)
        z = latents / self.config.scaling_factor + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return (decoder or self.decoder)(z)

    def forward(self, images: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Encode then decode (the reconstruction)."""
        return self.decode(self.encode(images, sample=sample))
