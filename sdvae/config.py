"""VAEConfig: every architectural and scaling choice of the KL autoencoder, as plain values.

The defaults are Stable Diffusion 1.x/2.x; ``VAEConfig.sdxl()``, ``.sd3()`` and ``.flux()``
give the others. Tiny configs (``VAEConfig.tiny()``) serve the tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["VAEConfig"]


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

    def __post_init__(self):
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
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
        for c in self.block_out_channels:
            if c < 1 or c % self.norm_num_groups:
                raise ValueError(
                    f"VAEConfig.block_out_channels={self.block_out_channels}: every entry must "
                    f"be a positive multiple of norm_num_groups={self.norm_num_groups}"
                )
        if not self.norm_eps > 0:
            raise ValueError(f"VAEConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.scaling_factor == 0:
            raise ValueError("VAEConfig.scaling_factor must be non-zero")

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
    def tiny(cls, **overrides) -> VAEConfig:
        """A few-thousand-parameter config with every kind of block, for tests."""
        base = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
        return cls(**{**base, **overrides})

    # ---------------------------------------------------------------- derived
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------ diffusers configs
    def to_diffusers(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' ``AutoencoderKL`` for this config."""
        n = len(self.block_out_channels)
        return dict(
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
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor if self.shift_factor else None,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention,
        )

    @classmethod
    def from_diffusers(cls, config: dict[str, Any] | Any) -> VAEConfig:
        """Build from a diffusers ``AutoencoderKL`` config (its ``config.json`` or ``.config``)."""
        cfg = dict(config)
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
