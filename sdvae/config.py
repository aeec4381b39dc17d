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

__all__ = ["VAEConfig", "SUPPORTED_DIFFUSERS_CLASSES"]

#: The diffusers autoencoder classes whose architecture ``VAEConfig`` describes.
SUPPORTED_DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")


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
            raise ValueError(
                f"config _class_name={kind!r}: sdvae supports diffusers' "
                f"{' and '.join(SUPPORTED_DIFFUSERS_CLASSES)}"
            )
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
