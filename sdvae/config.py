"""VAEConfig: every architectural and scaling choice of the KL autoencoder, as plain values.

The defaults are Stable Diffusion 1.x/2.x; ``VAEConfig.sdxl()``, ``.sd3()``, ``.flux()`` and
``.flux2()`` give the others. Tiny configs (``VAEConfig.tiny()``) serve the tests.

FLUX.2 (diffusers' ``AutoencoderKLFlux2``) is the same autoencoder with 32 latent channels, an
optional separate list of decoder channels, and a ``BatchNorm2d`` (``batch_norm_eps`` set)
over 2x2-patchified latents whose running statistics normalize the latents the pipeline feeds
its transformer; its latents have no scaling factor or shift of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "VAEConfig",
    "WanConfig",
    "SUPPORTED_DIFFUSERS_CLASSES",
    "WAN_DIFFUSERS_CLASSES",
    "REFUSED_DIFFUSERS_CLASSES",
    "refusal",
]

#: The diffusers autoencoder classes whose architecture ``VAEConfig`` describes.
SUPPORTED_DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
#: The diffusers video autoencoder classes whose architecture ``WanConfig`` describes.
WAN_DIFFUSERS_CLASSES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")
#: Diffusers autoencoders that resemble a supported family but are not one, and why.
REFUSED_DIFFUSERS_CLASSES = {
    "AutoencoderKLQwenImage21": (
        "Qwen-Image 2's VAE is not one of the supported architectures: a 2-D specialization "
        "of Wan 2.2's residual design (Conv2d weights, no time axis), with five levels, 64 "
        "latent channels and 4-channel input and output"
    ),
}


def refusal(kind: str) -> str:
    """Why diffusers class ``kind`` is not supported, naming the classes that are."""
    supported = " and ".join(SUPPORTED_DIFFUSERS_CLASSES + WAN_DIFFUSERS_CLASSES)
    why = REFUSED_DIFFUSERS_CLASSES.get(kind)
    return (f"{why}; " if why else "") + f"sdvae supports diffusers' {supported}"


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512
    #: The decoder's channels per level when they differ from the encoder's (FLUX.2 option).
    decoder_block_out_channels: tuple[int, ...] | None = None
    #: FLUX.2: the eps of the BatchNorm over 2x2-patchified latents (None: no such norm).
    batch_norm_eps: float | None = None
    batch_norm_momentum: float = 0.1

    def __post_init__(self):
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
        )
        if self.decoder_block_out_channels is not None:
            object.__setattr__(
                self,
                "decoder_block_out_channels",
                tuple(int(c) for c in self.decoder_block_out_channels),
            )
        ints = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
        }
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one level")
        for name in ("block_out_channels", "decoder_block_out_channels"):
            chans = getattr(self, name)
            for c in chans or ():
                if c < 1 or c % self.norm_num_groups:
                    raise ValueError(
                        f"VAEConfig.{name}={chans}: every entry must be a positive multiple "
                        f"of norm_num_groups={self.norm_num_groups}"
                    )
        dec = self.decoder_block_out_channels
        if dec is not None and len(dec) != len(self.block_out_channels):
            raise ValueError(
                f"VAEConfig.decoder_block_out_channels={dec} must have one entry per level, "
                f"like block_out_channels={self.block_out_channels}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"VAEConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.scaling_factor == 0:
            raise ValueError("VAEConfig.scaling_factor must be non-zero")
        if self.batch_norm_eps is not None:
            if not self.batch_norm_eps > 0:
                raise ValueError(
                    f"VAEConfig.batch_norm_eps must be > 0 or None, got {self.batch_norm_eps!r}"
                )
            if (self.scaling_factor, self.shift_factor) != (1.0, 0.0):
                raise ValueError(
                    "VAEConfig with batch_norm_eps (FLUX.2): the latents are normalized by the "
                    "BatchNorm's running statistics, so scaling_factor and shift_factor must "
                    f"stay 1.0 and 0.0, got {self.scaling_factor} and {self.shift_factor}"
                )

    # ------------------------------------------------------------------ presets
    @classmethod
    def sd(cls, **overrides) -> VAEConfig:
        """Stable Diffusion 1.x / 2.x (the default)."""
        return cls(**overrides)

    @classmethod
    def sdxl(cls, **overrides) -> VAEConfig:
        """SDXL: the SD architecture with scaling factor 0.13025."""
        return cls(**{"scaling_factor": 0.13025, "sample_size": 1024, **overrides})

    @classmethod
    def sd3(cls, **overrides) -> VAEConfig:
        """Stable Diffusion 3: 16 latent channels, shift, no quant convs."""
        base = dict(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=1024,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def flux(cls, **overrides) -> VAEConfig:
        """FLUX.1: 16 latent channels, shift, no quant convs."""
        return cls.sd3(**{"scaling_factor": 0.3611, "shift_factor": 0.1159, **overrides})

    @classmethod
    def flux2(cls, **overrides) -> VAEConfig:
        """FLUX.2 (diffusers' ``AutoencoderKLFlux2`` defaults): 32 latent channels, quant convs,
        latents 2x2-patchified and normalized by a BatchNorm's running statistics (eps 1e-4)."""
        base = dict(
            latent_channels=32,
            scaling_factor=1.0,
            shift_factor=0.0,
            sample_size=1024,
            batch_norm_eps=1e-4,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> VAEConfig:
        """A few-thousand-parameter config with every kind of block, for tests."""
        base = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
        return cls(**{**base, **overrides})

    # ---------------------------------------------------------------- derived
    @property
    def downsample_factor(self) -> int:
        """Image pixels per pixel of the encoder's raw latents, along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def is_flux2(self) -> bool:
        """FLUX.2's latents: 2x2-patchified and normalized by the BatchNorm's statistics."""
        return self.batch_norm_eps is not None

    @property
    def patch_size(self) -> int:
        """Side of the patches the pipeline's latents are made of (2 for FLUX.2, else 1)."""
        return 2 if self.is_flux2 else 1

    @property
    def image_factor(self) -> int:
        """Image pixels per pixel of the latents ``VAE.encode`` returns, along each side
        (images must be multiples of it: 8 for SD, 16 for FLUX.2)."""
        return self.downsample_factor * self.patch_size

    @property
    def pipeline_latent_channels(self) -> int:
        """Channels of the latents ``VAE.encode`` returns and ``VAE.decode`` takes (the
        pipeline's latents: ``latent_channels`` times the patch area)."""
        return self.latent_channels * self.patch_size**2

    @property
    def diffusers_class(self) -> str:
        """The diffusers class with this architecture."""
        return "AutoencoderKLFlux2" if self.is_flux2 else "AutoencoderKL"

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------ diffusers configs
    def to_diffusers(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' ``AutoencoderKL`` for this config (of
        ``AutoencoderKLFlux2`` for a FLUX.2 config: see ``diffusers_class``)."""
        n = len(self.block_out_channels)
        common = dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            act_fn="silu",
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention,
        )
        if self.is_flux2:
            return dict(
                common,
                decoder_block_out_channels=self.decoder_block_out_channels,
                batch_norm_eps=self.batch_norm_eps,
                batch_norm_momentum=self.batch_norm_momentum,
                patch_size=(2, 2),
            )
        if self.decoder_block_out_channels is not None:
            raise ValueError(
                "decoder_block_out_channels has no AutoencoderKL equivalent (only FLUX.2's "
                "AutoencoderKLFlux2 takes it)"
            )
        return dict(
            common,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor if self.shift_factor else None,
        )

    @classmethod
    def from_diffusers(cls, config: dict[str, Any] | Any) -> VAEConfig:
        """Build from a diffusers ``AutoencoderKL`` or ``AutoencoderKLFlux2`` config (its
        ``config.json`` or ``.config``)."""
        cfg = dict(config)
        kind = cfg.get("_class_name")
        if kind is not None and kind not in SUPPORTED_DIFFUSERS_CLASSES:
            raise ValueError(f"config _class_name={kind!r}: {refusal(kind)}")
        act = cfg.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"config act_fn={act!r}: sdvae supports only 'silu'")
        for key in ("down_block_types", "up_block_types"):
            kinds = set(cfg.get(key) or ())
            allowed = {"DownEncoderBlock2D"} if key.startswith("down") else {"UpDecoderBlock2D"}
            if kinds - allowed:
                raise ValueError(f"config {key}={cfg[key]!r}: sdvae supports only {allowed}")
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise ValueError(
                "config has latents_mean/latents_std (per-channel latent statistics): "
                "not supported by sdvae's scaling"
            )
        if kind == "AutoencoderKLFlux2" or "batch_norm_eps" in cfg:
            return cls._from_diffusers_flux2(cfg)
        shift = cfg.get("shift_factor")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            shift_factor=float(shift) if shift is not None else 0.0,
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            sample_size=cfg.get("sample_size", 512),
        )

    @classmethod
    def _from_diffusers_flux2(cls, cfg: dict[str, Any]) -> VAEConfig:
        patch = tuple(cfg.get("patch_size") or (2, 2))
        if patch != (2, 2):
            raise ValueError(
                f"config patch_size={patch}: sdvae supports FLUX.2's 2x2 patches (the pipeline's "
                "_patchify_latents is 2x2)"
            )
        dec = cfg.get("decoder_block_out_channels")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 32),
            block_out_channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512))),
            decoder_block_out_channels=tuple(dec) if dec is not None else None,
            layers_per_block=cfg.get("layers_per_block", 2),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            sample_size=cfg.get("sample_size", 1024),
            batch_norm_eps=float(cfg.get("batch_norm_eps", 1e-4)),
            batch_norm_momentum=float(cfg.get("batch_norm_momentum", 0.1)),
        )


# ---------------------------------------------------------------------------- Wan family
#: Wan 2.1's per-channel latent statistics (diffusers' ``AutoencoderKLWan`` defaults, also
#: Qwen-Image's): the pipelines feed their transformer ``(z - mean) / std``.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanConfig:
    """The Wan video VAE family (``sdvae.wan.WanVAE``), as diffusers' ``AutoencoderKLWan`` /
    ``AutoencoderKLQwenImage`` configs name it (``temperal_*`` spelled as there).

    * ``base_dim`` / ``decoder_base_dim``: channels of the first level (times ``dim_mult``);
    * ``temperal_downsample[i]``: level ``i``'s downsampler also halves the frames (the
      decoder mirrors it);
    * ``is_residual``: Wan 2.2's design (residual down/up blocks with parameter-free
      ``AvgDown3D``/``DupUp3D`` shortcuts);
    * ``patch_size``: pixels are ``patch_size``-squared patchified before the encoder (Wan
      2.2 TI2V-5B: 2); ``in_channels`` / ``out_channels`` count the patchified channels, as
      diffusers 0.42 does (Wan 2.2: 12 = 3 x 2 x 2);
    * ``latents_mean`` / ``latents_std``: per-channel statistics of the pipeline's latents
      (None: unknown, only ``raw=True`` latents are available);
    * ``diffusers_class``: which diffusers class the config comes from / converts to."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    latents_mean: tuple[float, ...] | None = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] | None = WAN21_LATENTS_STD
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    diffusers_class: str = "AutoencoderKLWan"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        set_(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None:
                set_(self, name, tuple(float(f) for f in v))
        ints = {"base_dim": self.base_dim, "z_dim": self.z_dim,
                "num_res_blocks": self.num_res_blocks, "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "decoder_base_dim": self.decoder_base_dim or 1}  # fmt: skip
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"WanConfig.dim_mult must be positive ints, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanConfig.temperal_downsample={self.temperal_downsample} must have one entry "
                f"per downsampling (len(dim_mult) - 1 = {len(self.dim_mult) - 1})"
            )
        if self.patch_size is not None and (
            not isinstance(self.patch_size, int) or self.patch_size < 1
        ):
            raise ValueError(f"WanConfig.patch_size must be None or a positive int, got "
                             f"{self.patch_size!r}")  # fmt: skip
        p2 = (self.patch_size or 1) ** 2
        if self.in_channels % p2 or self.out_channels % p2:
            raise ValueError(f"WanConfig: in_channels={self.in_channels} and out_channels="
                             f"{self.out_channels} count patchified channels: they must be "
                             f"multiples of patch_size**2 = {p2}")  # fmt: skip
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("WanConfig: give both latents_mean and latents_std, or neither")
        if self.latents_mean is not None:
            for name in ("latents_mean", "latents_std"):
                if len(getattr(self, name)) != self.z_dim:
                    raise ValueError(f"WanConfig.{name} must have z_dim={self.z_dim} entries, "
                                     f"got {len(getattr(self, name))}")  # fmt: skip
            if min(self.latents_std) <= 0:
                raise ValueError("WanConfig.latents_std must be positive")
        if self.diffusers_class not in WAN_DIFFUSERS_CLASSES:
            raise ValueError(f"WanConfig.diffusers_class must be one of {WAN_DIFFUSERS_CLASSES}, "
                             f"got {self.diffusers_class!r}")  # fmt: skip
        if self.diffusers_class == "AutoencoderKLQwenImage" and (
            self.is_residual or self.patch_size not in (None, 1)
            or self.decoder_base_dim not in (None, self.base_dim)
            or self.in_channels != self.out_channels
        ):  # fmt: skip
            raise ValueError(
                "WanConfig for AutoencoderKLQwenImage: Wan 2.1's design only (no "
                "is_residual, patch_size, decoder_base_dim; in = out channels)"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def wan21(cls, **overrides) -> WanConfig:
        """Wan 2.1 (diffusers' ``AutoencoderKLWan`` defaults; Wan 2.2's 14B models use it too)."""
        return cls(**overrides)

    @classmethod
    def qwen_image(cls, **overrides) -> WanConfig:
        """Qwen-Image (``AutoencoderKLQwenImage``): Wan 2.1's architecture and statistics."""
        return cls(**{"diffusers_class": "AutoencoderKLQwenImage", **overrides})

    @classmethod
    def wan22(cls, **overrides) -> WanConfig:
        """Wan 2.2 TI2V-5B: residual blocks, 48 latent channels, 2x2 patches (16x spatial).
        Its latent statistics come with its diffusers config (``latents_mean``/``latents_std``);
        without them only ``raw=True`` latents are available."""
        base = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                    patch_size=2, in_channels=12, out_channels=12,
                    scale_factor_spatial=16, latents_mean=None,
                    latents_std=None)  # fmt: skip
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> WanConfig:
        """Every kind of block at a few thousand parameters (tests): two temporal levels."""
        z = overrides.get("z_dim", 4)
        base = dict(base_dim=8, z_dim=z, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                    temperal_downsample=(False, True, True),
                    latents_mean=tuple(0.25 * i - 0.3 for i in range(z)),
                    latents_std=tuple(1.0 + 0.5 * i for i in range(z)))  # fmt: skip
        return cls(**{**base, **overrides})

    # ---------------------------------------------------------------- derived
    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4: T frames <-> 1 + (T - 1) / 4 latents)."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along each side (patches included)."""
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def image_channels(self) -> int:
        """Channels of the videos (``in_channels`` before patchifying)."""
        p2 = (self.patch_size or 1) ** 2
        return self.in_channels // p2

    @property
    def has_latent_stats(self) -> bool:
        return self.latents_mean is not None

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)

    def to_diffusers(self) -> dict[str, Any]:
        """Keyword arguments of ``diffusers_class`` for this config."""
        common = dict(base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult),
                      num_res_blocks=self.num_res_blocks, attn_scales=[],
                      temperal_downsample=list(self.temperal_downsample), dropout=0.0,
                      latents_mean=list(self.latents_mean or (0.0,) * self.z_dim),
                      latents_std=list(self.latents_std or (1.0,) * self.z_dim))  # fmt: skip
        if self.diffusers_class == "AutoencoderKLQwenImage":
            return dict(common, input_channels=self.in_channels)
        return dict(common, decoder_base_dim=self.decoder_base_dim,
                    is_residual=self.is_residual, in_channels=self.in_channels,
                    out_channels=self.out_channels, patch_size=self.patch_size,
                    scale_factor_temporal=self.scale_factor_temporal,
                    scale_factor_spatial=self.scale_factor_spatial)  # fmt: skip

    @classmethod
    def from_diffusers(cls, config: dict[str, Any] | Any) -> WanConfig:
        """From an ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` config (``config.json`` or
        ``.config``; ``_class_name`` says which, Wan when absent). Refused: attention in the
        encoder's levels (``attn_scales``) and dropout, which no released model uses."""
        cfg = dict(config)
        kind = cfg.get("_class_name") or "AutoencoderKLWan"
        if kind not in WAN_DIFFUSERS_CLASSES:
            raise ValueError(f"config _class_name={kind!r}: WanConfig describes "
                             f"{' and '.join(WAN_DIFFUSERS_CLASSES)}; {refusal(kind)}")  # fmt: skip
        if cfg.get("attn_scales"):
            raise ValueError(
                f"config attn_scales={cfg['attn_scales']!r}: attention inside the "
                "encoder's levels is not supported (no released model has it)"
            )
        if cfg.get("dropout", 0.0):
            raise ValueError(f"config dropout={cfg['dropout']!r}: only 0.0 is supported")
        defaults = cls()
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        chans = cfg.get("input_channels", 3) if kind == "AutoencoderKLQwenImage" else None
        return cls(
            base_dim=cfg.get("base_dim", defaults.base_dim),
            decoder_base_dim=cfg.get("decoder_base_dim"),
            z_dim=cfg.get("z_dim", defaults.z_dim),
            dim_mult=tuple(cfg.get("dim_mult", defaults.dim_mult)),
            num_res_blocks=cfg.get("num_res_blocks", defaults.num_res_blocks),
            temperal_downsample=tuple(
                cfg.get("temperal_downsample", defaults.temperal_downsample)
            ),  # fmt: skip
            is_residual=bool(cfg.get("is_residual", False)),
            in_channels=chans or cfg.get("in_channels", 3),
            out_channels=chans or cfg.get("out_channels", 3),
            patch_size=cfg.get("patch_size"),
            latents_mean=tuple(mean) if mean is not None else None,
            latents_std=tuple(std) if std is not None else None,
            scale_factor_temporal=cfg.get("scale_factor_temporal") or 4,
            scale_factor_spatial=cfg.get("scale_factor_spatial") or 8,
            diffusers_class=kind,
        )
