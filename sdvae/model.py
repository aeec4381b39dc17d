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

from . import dispatch, execute, steps
from .config import VAEConfig
from .dispatch import fold_upsample_weight
from .graphs import GraphedModel

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


class _Switch:
    """The ``fused`` switch of a module (set by ``sdvae.optimize``): setting it marks lowered
    steps stale (``sdvae.steps.changed``), so the next call lowers again."""

    @property
    def fused(self) -> bool:
        return self.__dict__.get("_fused", False)

    @fused.setter
    def fused(self, value: bool) -> None:
        self.__dict__["_fused"] = bool(value)
        steps.changed()


class GroupNorm(_Switch, nn.GroupNorm):
    """GroupNorm, optionally followed by SiLU (``silu=True``); parameter names as nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, *, silu: bool):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.silu = silu
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                   silu=self.silu, fused=self.fused)  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


class Conv2d(_Switch, nn.Conv2d):
    """``nn.Conv2d`` (same parameters and names) that can run through ``sdvae.ops.conv2d``
    (``fused``, set by ``sdvae.optimize``): one cuDNN graph with the bias and an optional
    residual fused into the conv's epilogue, no padded copy (the whole-tensor executor,
    ``sdvae.execute.conv``, passes those)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        return dispatch.conv2d(x, self.weight, self.bias, fused=self.fused,
                               stride=self.stride[0], padding=(pw, pw, ph, ph))  # fmt: skip


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unfused, the plain eager block; fused, the whole-tensor executor runs it
        (``sdvae.execute.resnet``)."""
        if not self.norm2.fused:
            h = self.conv1(self.norm1(x))
            h = self.norm2(h)
            h = self.conv2(h)
            if self.conv_shortcut is not None:
                x = self.conv_shortcut(x)
            return x + h
        state = [x]
        del x
        execute.resnet(resnet_record(self, _WHOLE), state, None, owned=False)
        return state.pop()


class AttentionBlock(_Switch, nn.Module):
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
        if self.fused:  # the whole-tensor executor (sdvae.execute.attention)
            return execute.attention(attention_record(self, _WHOLE), x)
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, L, C)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=c**-0.5
        ).squeeze(1)
        o = self.to_out[0](o)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class Downsample(_Switch, nn.Module):
    """Zero pad one column right and one row bottom, then a 3x3 stride-2 conv."""

    padding = (0, 1, 0, 1)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            c = self.conv
            return dispatch.pad_conv2d(x, c.weight, c.bias, fused=True, padding=self.padding)
        return self.conv(F.pad(x, self.padding))


class Upsample(_Switch, nn.Module):
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
        dispatch.refold_upsample(self, self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return dispatch.upsample(self, self.conv, x)
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


def _fused_run(part) -> bool:
    """Whether ``part`` (Encoder/Decoder) runs the whole-tensor executor (``sdvae.execute``):
    the fused path, where activations are freed early and GroupNorms write in place."""
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
            return execute.run(_lowered(self), x)
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
        if _fused_run(self):
            return execute.run(_lowered(self), z)
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(self.conv_norm_out(x))


# ------------------------------------------------------------------ lowering (sdvae.steps)
def resnet_record(block: ResnetBlock, rd: steps.Reader, name: str = "") -> steps.Resnet:
    sc = block.conv_shortcut
    return steps.Resnet(
        name,
        rd.norm(block.norm1, block.norm1.fused, f"{name}.norm1"),
        rd.conv(block.conv1, 3, f"{name}.conv1"),
        rd.norm(block.norm2, block.norm2.fused, f"{name}.norm2"),
        rd.conv(block.conv2, 3, f"{name}.conv2"),
        None if sc is None else rd.conv(sc, 1, f"{name}.conv_shortcut"),
        block.conv1.in_channels,
        block.conv1.out_channels,
    )


def attention_record(a: AttentionBlock, rd: steps.Reader, name: str = "") -> steps.Attention:
    c = a.to_q.in_features
    return steps.Attention(
        name, rd.norm(a.group_norm, a.group_norm.fused, f"{name}.group_norm"),
        rd.t(a.to_q.weight), rd.t(a.to_q.bias), rd.t(a.to_k.weight), rd.t(a.to_k.bias),
        rd.t(a.to_v.weight), rd.t(a.to_v.bias), rd.t(a.to_out[0].weight),
        rd.t(a.to_out[0].bias), 1, c**-0.5, True, 1.0, rd.fused(a.fused), c,
    )  # fmt: skip


def lower(part: Encoder | Decoder, rd: steps.Reader) -> steps.Lowered:
    """sdvae's ``Encoder`` / ``Decoder`` as step records (``sdvae.steps``): the live
    parameters and each module's ``fused`` switch."""
    kind = "encoder" if isinstance(part, Encoder) else "decoder"

    def up(u: Upsample, name: str) -> steps.Upsample:
        return steps.upsample_record(u, name, rd, u.fused)

    def down(d: Downsample, name: str) -> steps.Downsample:
        conv = rd.conv(d.conv, 3, f"{name}.conv", stride=2, padding=0, fused=d.fused)
        return steps.Downsample(name, conv, d.conv.in_channels)

    found = steps.walk(
        part, kind, rd,
        res=lambda b, name: resnet_record(b, rd, name),
        attn=lambda a, name: attention_record(a, rd, name),
        up=up, down=down, out_fused=part.conv_norm_out.fused,
    )  # fmt: skip
    return steps.Lowered(kind, found, part.conv_in.in_channels,
                         "fused" if _fused_run(part) else "sdvae")  # fmt: skip


steps.register(lambda part: isinstance(part, (Encoder, Decoder)), lower)

#: The whole-tensor executor's reader: the parameters themselves, the modules' own choices
#: (no dtype, device or meta: neither is read in that mode).
_WHOLE = steps.Reader(torch.float32, torch.device("cpu"), banded=False)


def _lowered(part: Encoder | Decoder) -> steps.Lowered:
    """``part``'s steps for the whole-tensor executor, lowered again only when a module's
    structure changed since (``sdvae.steps.generation``): lowering costs about a millisecond
    of Python, a decode of a small image only a few."""
    hit = _LOWERED.get(part)
    now = steps.generation()
    if hit is None or hit[0] != now:
        hit = _LOWERED[part] = (now, lower(part, _WHOLE))
    return hit[1]


#: part -> (generation, its steps); weak, so that neither a copy nor a pickle carries them
_LOWERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class VAE(GraphedModel, nn.Module):
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
        self.disable_cuda_graphs()  # sdvae.optimize(cuda_graph=True): sdvae.graphs
        #: Set by ``sdvae.optimize`` on CUDA: inputs are brought to this format first (one
        #: small copy of the images or latents) so that every layer runs in it.
        self.memory_format: torch.memory_format | None = None

    # ------------------------------------------------------------ CUDA graphs
    def graph_functions(self) -> dict:
        """What ``sdvae.graphs`` may replay: the moments and the two decodes."""
        return {
            "moments": self.run_encoder,
            "decode": self.run_decoder,
            "decode_raw": lambda latents: self.run_decoder(latents, raw=True),
        }

    def graph_folds(self) -> list:
        return [(m, m.conv) for m in self.modules() if isinstance(m, Upsample)]

    def graph_prepare(self, name: str, x: torch.Tensor) -> None:
        """Refolds, and FLUX.2's folded normalization made here on the caller's stream, not
        first during the warm-up on the graph's side stream."""
        super().graph_prepare(name, x)
        if name == "decode" and self.config.is_flux2:
            self._norm_folded("decode", x)

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
        graphed = self.graph_runner("moments", images)
        return graphed(images) if graphed is not None else self.run_encoder(images)

    def run_encoder(self, images: torch.Tensor, encoder=None) -> torch.Tensor:
        """The moments of checked ``images``, no graphs and no budget: the whole-tensor path,
        or ``encoder`` (a callable standing in for ``self.encoder``, e.g. the banded one)."""
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
        graphed = self.graph_runner(name, latents)
        if graphed is not None:
            return graphed(latents)
        return self.run_decoder(latents, raw=raw)

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

    def run_decoder(self, latents: torch.Tensor, decoder=None, *, raw: bool = False):
        """The images of checked ``latents`` (``raw``: the encoder's own), no graphs and no
        budget: the whole-tensor path, or ``decoder`` standing in for ``self.decoder``."""
        if self.memory_format is not None:
            latents = latents.contiguous(memory_format=self.memory_format)
        return (decoder or self.decoder)(self._decoder_input(latents, raw=raw))

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
            z = dispatch.conv2d(latents, w, b, fused=pqc.fused, padding=(0, 0, 0, 0))
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

        Kept while the weights and statistics are unchanged (``dispatch.derived``: recomputed
        every call under torch.compile or CUDA-graph capture, under autograd, and for
        inference tensors)."""
        pqc = self.post_quant_conv if which == "decode" else None
        sources = [self.bn.running_mean, self.bn.running_var]
        if pqc is not None:
            sources += [pqc.weight] + ([pqc.bias] if pqc.bias is not None else [])
        # The encode factors stay in float64 for a float64 model, else fp32 (the kernel reads
        # fp32); the decode fold is cast to the latents' dtype, as a conv's weight would be.
        dtype = x.dtype if which == "decode" else torch.promote_types(x.dtype, torch.float32)
        return dispatch.derived(self._norm_cache, which, sources, dtype, x.device,
                                lambda: self._fold_norm(which, pqc, x.device, dtype))  # fmt: skip

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
