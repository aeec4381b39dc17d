"""Checkpoint loading: CompVis/ldm and diffusers key formats, safetensors first.

``load`` accepts a state dict, a ``.safetensors`` file, a ``.ckpt/.pt/.pth/.bin`` file (read
with ``torch.load(weights_only=True)``: a pickle never runs code), a diffusers
``save_pretrained`` folder (its ``config.json`` gives the config) or a whole pipeline folder
(its ``vae/`` subfolder). Keys may be CompVis (``encoder.down.0.block.0...``) or diffusers
(``encoder.down_blocks.0.resnets.0...``, including the old ``query/key/value/proj_attn``
attention names), bare or under ``first_stage_model.`` / ``vae.`` inside a whole SD
checkpoint. Every key of the model must be present with the right shape and every key of the
file must be used (the discriminator/LPIPS ``loss.*`` entries of VAE training checkpoints and
the two EMA counters are the only ones skipped); otherwise ``load`` raises and lists them.
FLUX.2's VAE (diffusers' ``AutoencoderKLFlux2``) loads the same ways with its diffusers keys,
``bn.running_mean``, ``bn.running_var`` and ``bn.num_batches_tracked`` included; its
original (Black Forest Labs) key names are not mapped, since diffusers' single-file loader
(0.42) has no converter for this class to check such a mapping against.
The model is built on the meta device and receives the checkpoint's tensors, so nothing is
ever left randomly initialised.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from . import wan_keys
from .config import (
    SUPPORTED_DIFFUSERS_CLASSES,
    WAN_DIFFUSERS_CLASSES,
    VAEConfig,
    WanConfig,
    refusal,
)
from .model import VAE
from .wan import WanVAE

__all__ = [
    "load",
    "from_diffusers",
    "to_diffusers",
    "read_state_dict",
    "convert_state_dict",
    "CheckpointError",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
# Entries of VAE *training* checkpoints that are not part of the autoencoder.
_SKIPPED = re.compile(r"^(loss\.|model_ema\.(decay|num_updates)$)")
_PREFIXES = ("first_stage_model.", "vae.")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: lists what is missing, extra or mis-shaped."""


# --------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file: {path!r}")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"path {path!r} is not a readable safetensors file: {exc}"
            ) from exc
    if lower.endswith(PICKLE_SUFFIXES):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
            raise CheckpointError(
                f"path {path!r} could not be read with torch.load(weights_only=True) "
                f"(sdvae never unpickles arbitrary objects; convert it to .safetensors): {exc}"
            ) from exc
        return _unwrap(obj, path)
    raise ValueError(
        f"path {path!r}: unknown weights format (expected .safetensors, "
        f"{', '.join(PICKLE_SUFFIXES)}, or a diffusers folder)"
    )


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not named tensors: {bad[:10]}")
    return dict(obj)


def _read_folder(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
        os.path.join(path, "vae")
    ):
        path = os.path.join(path, "vae")  # a whole pipeline folder
    for name in DIFFUSERS_WEIGHT_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            break
    else:
        raise FileNotFoundError(
            f"path {path!r}: a diffusers folder must hold one of {DIFFUSERS_WEIGHT_FILES}"
        )
    cfg = None
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as fh:
            cfg = json.load(fh)
    return read_state_dict(f), cfg


# --------------------------------------------------------------------------- key formats
def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


_RESNET_RENAME = {"nin_shortcut": "conv_shortcut"}
_ATTN_COMPVIS = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _compvis_key(key: str, levels: int) -> str:
    m = re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
    if m:
        i, j, layer, rest = m.groups()
        return f"encoder.down_blocks.{i}.resnets.{j}.{_RESNET_RENAME.get(layer, layer)}.{rest}"
    m = re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    m = re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
    if m:
        i, j, layer, rest = m.groups()
        k = levels - 1 - int(i)
        return f"decoder.up_blocks.{k}.resnets.{j}.{_RESNET_RENAME.get(layer, layer)}.{rest}"
    m = re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$", key)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    m = re.match(r"^(encoder|decoder)\.mid\.block_([12])\.([a-z_0-9]+)\.(.+)$", key)
    if m:
        part, n, layer, rest = m.groups()
        return f"{part}.mid_block.resnets.{int(n) - 1}.{_RESNET_RENAME.get(layer, layer)}.{rest}"
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.([a-z_]+)\.(weight|bias)$", key)
    if m and m.group(2) in _ATTN_COMPVIS:
        part, layer, what = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTN_COMPVIS[layer]}.{what}"
    m = re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key)
    if m:
        return f"{m.group(1)}.conv_norm_out.{m.group(2)}"
    return key


def _legacy_diffusers_key(key: str) -> str:
    m = re.match(r"^(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
    if m:
        return f"{m.group(1)}{_ATTN_LEGACY[m.group(2)]}.{m.group(3)}"
    return key


def detect_format(keys) -> str:
    """'compvis' or 'diffusers', from the key names (after any prefix is stripped)."""
    keys = list(keys)
    if any(re.match(r"^(encoder\.down\.|decoder\.up\.|(encoder|decoder)\.mid\.)", k) for k in keys):
        return "compvis"
    if any(
        re.match(
            r"^(encoder\.down_blocks\.|decoder\.up_blocks\.|(encoder|decoder)\.mid_block\.)", k
        )
        for k in keys
    ):
        return "diffusers"
    raise CheckpointError(
        "the state dict holds no VAE encoder/decoder keys (neither CompVis 'encoder.down.*' "
        f"nor diffusers 'encoder.down_blocks.*'); first keys: {sorted(keys)[:8]}"
    )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VAEConfig
) -> dict[str, torch.Tensor]:
    """Any supported key format -> sdvae's (= diffusers') names, tensors reshaped where needed."""
    sd = {k: v for k, v in _strip_prefix(dict(state_dict)).items() if not _SKIPPED.match(k)}
    fmt = detect_format(sd)
    levels = len(config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _compvis_key(key, levels) if fmt == "compvis" else _legacy_diffusers_key(key)
        if ".attentions.0.to_" in new and new.endswith(".weight") and value.dim() == 4:
            if value.shape[2:] != (1, 1):
                raise CheckpointError(
                    f"{key}: attention weight must be 1x1, got {tuple(value.shape)}"
                )
            value = value[:, :, 0, 0]  # CompVis 1x1 conv -> linear
        if new in out:
            raise CheckpointError(f"two checkpoint keys map onto {new!r} (one is {key!r})")
        out[new] = value
    return out


def _check_against(model: VAE | WanVAE, sd: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != expected[k]
    )
    # Floating weights must be floating; integer buffers (BatchNorm's num_batches_tracked)
    # must not be.
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    not_float = sorted(
        k for k, v in sd.items() if k in expected and v.is_floating_point() != (k in floating)
    )
    if missing or unexpected or shapes or not_float:
        parts = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", shapes),
            ("tensors of the wrong kind (floating vs integer)", not_float),
        ):
            if items:
                shown = "\n    ".join(items[:40])
                more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
                parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
        c = model.config
        if isinstance(c, WanConfig):
            what = (f"Wan VAE config (base_dim={c.base_dim}, z_dim={c.z_dim}, dim_mult="
                    f"{c.dim_mult}, num_res_blocks={c.num_res_blocks})")  # fmt: skip
        else:
            what = (f"VAE config (block_out_channels={c.block_out_channels}, "
                    f"latent_channels={c.latent_channels})")  # fmt: skip
        raise CheckpointError(
            f"the checkpoint does not match the {what}; refusing to load:\n" + "\n".join(parts)
        )


def _build(config: VAEConfig | WanConfig, sd: Mapping[str, torch.Tensor], dtype,
           device) -> VAE | WanVAE:  # fmt: skip
    with torch.device("meta"):
        model = WanVAE(config) if isinstance(config, WanConfig) else VAE(config)
    _check_against(model, sd)
    # copy=True: the model never shares storage with the caller's tensors (from_diffusers,
    # a state dict), so changing one never changes the other.
    sd = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- public API
def load(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    config: VAEConfig | WanConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VAE | WanVAE:
    """Load a VAE from a checkpoint file, a diffusers folder or a state dict.

    ``config=None`` uses the folder's ``config.json`` for a diffusers folder; otherwise
    ``VAEConfig.flux2()`` when the weights hold FLUX.2's ``bn.running_mean``, else the SD 1.x
    config (``VAEConfig()``): pass ``VAEConfig.sdxl()`` for SDXL's VAE, whose weights have the
    same shapes but another scaling factor.

    The Wan video family (``sdvae.WanVAE``: Wan 2.1/2.2, Qwen-Image) loads the same ways, with
    diffusers' keys or the original checkpoints' (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``,
    ``sdvae.wan_keys``). Without a config its architecture is read off the weights' shapes
    (``wan_config_from_weights``); the latent statistics then are Wan 2.1's for a 16-channel
    Wan 2.1-design model and unknown otherwise (raw latents only): give a ``WanConfig`` (or
    the diffusers folder's config.json) for Wan 2.2's.
    """
    if config is not None and not isinstance(config, (VAEConfig, WanConfig)):
        raise TypeError(
            f"config must be a sdvae.VAEConfig, a sdvae.WanConfig or None, got "
            f"{type(config).__name__}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    folder_cfg = None
    if isinstance(path_or_state_dict, Mapping):
        sd = _unwrap(path_or_state_dict, "state dict")
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path):
            sd, folder_cfg = _read_folder(path)
        elif os.path.exists(path):
            sd = read_state_dict(path)
        else:
            raise FileNotFoundError(f"path_or_state_dict: no such file or folder: {path!r}")
    else:
        raise TypeError(
            "path_or_state_dict must be a path or a dict of tensors, "
            f"got {type(path_or_state_dict).__name__}"
        )
    wan_folder = folder_cfg is not None and folder_cfg.get("_class_name") in WAN_DIFFUSERS_CLASSES
    if isinstance(config, WanConfig) or (config is None and (wan_folder or is_wan(sd))):
        sd = wan_state_dict(sd)
        if config is None:
            config = (
                WanConfig.from_diffusers(folder_cfg) if wan_folder else wan_config_from_weights(sd)
            )
        return _build(config, sd, dtype, device)
    if config is None:
        config = (
            VAEConfig.from_diffusers(folder_cfg) if folder_cfg is not None else default_config(sd)
        )
    return _build(config, convert_state_dict(sd, config), dtype, device)


# ---------------------------------------------------------------------------- Wan family
def is_wan(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds a Wan-family VAE: original Wan keys, or diffusers' Wan keys
    (5-D ``encoder.conv_in.weight``), bare or under a prefix."""
    sd = _strip_prefix(dict(state_dict))
    if wan_keys.is_original_wan(sd):
        return True
    w = sd.get("encoder.conv_in.weight", sd.get("decoder.conv_in.weight"))
    return isinstance(w, torch.Tensor) and w.dim() == 5


def wan_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Wan-family state dict under diffusers' names (original keys converted)."""
    sd = _strip_prefix(dict(state_dict))
    return wan_keys.convert_original_wan(sd) if wan_keys.is_original_wan(sd) else sd


def wan_config_from_weights(sd: Mapping[str, torch.Tensor]) -> WanConfig:
    """The ``WanConfig`` whose model has these (diffusers-named) weights' shapes: channels,
    levels, blocks per level, which downsamplers are temporal, Wan 2.2's residual design and
    its patch size (``in_channels`` = 3 x patch^2). CheckpointError naming the key when one
    the architecture needs is missing."""

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"a Wan VAE checkpoint needs {key!r}; it is missing")
        return sd[key]

    base = get("encoder.conv_in.weight").shape[0]
    cin = get("encoder.conv_in.weight").shape[1]
    z = get("post_quant_conv.weight").shape[0]
    residual = any(re.match(r"^encoder\.down_blocks\.\d+\.resnets\.", k) for k in sd)
    levels: list[list[int]] = [[]]  # per level, the blocks' output channels
    temporal: list[bool] = []
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))}
    for i in sorted(blocks):
        pre = f"encoder.down_blocks.{i}."
        if residual:
            j = 0
            while f"{pre}resnets.{j}.conv2.weight" in sd:
                levels[-1].append(sd[f"{pre}resnets.{j}.conv2.weight"].shape[0])
                j += 1
            if f"{pre}downsampler.resample.1.weight" in sd:
                temporal.append(f"{pre}downsampler.time_conv.weight" in sd)
                levels.append([])
        elif f"{pre}conv2.weight" in sd:
            levels[-1].append(sd[f"{pre}conv2.weight"].shape[0])
        elif f"{pre}resample.1.weight" in sd:
            temporal.append(f"{pre}time_conv.weight" in sd)
            levels.append([])
    levels = [lv for lv in levels if lv]
    if not levels or len({len(lv) for lv in levels}) != 1 or len(temporal) != len(levels) - 1:
        raise CheckpointError("the Wan VAE checkpoint's encoder levels could not be read "
                              f"(blocks per level: {[len(lv) for lv in levels]})")  # fmt: skip
    dim_mult = tuple(lv[-1] // base for lv in levels)
    dec_base = get("decoder.conv_in.weight").shape[0] // dim_mult[-1]
    cout = get("decoder.conv_out.weight").shape[0]
    patch = round((cin / 3) ** 0.5) if cin > 3 and cin % 3 == 0 else None
    wan21_stats = z == 16 and not residual
    return WanConfig(
        base_dim=base,
        decoder_base_dim=None if dec_base == base else dec_base,
        z_dim=z,
        dim_mult=dim_mult,
        num_res_blocks=len(levels[0]),
        temperal_downsample=tuple(temporal),
        is_residual=residual,
        in_channels=cin,
        out_channels=cout,
        patch_size=patch,
        latents_mean=WanConfig().latents_mean if wan21_stats else None,
        latents_std=WanConfig().latents_std if wan21_stats else None,
        scale_factor_spatial=2 ** len(temporal) * (patch or 1),
    )


def default_config(state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """The preset a checkpoint without a config is read with: FLUX.2's when it holds the
    latent BatchNorm's statistics (``bn.running_mean``, bare or under a prefix), else SD 1.x."""
    if "bn.running_mean" in _strip_prefix(dict(state_dict)):
        return VAEConfig.flux2()
    return VAEConfig()


def diffusers_kind(model, classes=SUPPORTED_DIFFUSERS_CLASSES) -> str | None:
    """The name of the diffusers class among ``classes`` (default: ``AutoencoderKL``,
    ``AutoencoderKLFlux2``) that ``model`` is an instance of, else None."""
    try:
        import diffusers
    except ImportError:
        return None
    for name in classes:
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(model, cls):
            return name
    return None


def check_diffusers_model(model, argname: str = "autoencoder_kl") -> str:
    """``diffusers_kind(model)``, or a TypeError naming what sdvae supports."""
    kind = diffusers_kind(model)
    if kind is None:
        raise TypeError(
            f"{argname} must be a diffusers {' or '.join(SUPPORTED_DIFFUSERS_CLASSES)} (the "
            f"autoencoders sdvae supports, with the Wan family's "
            f"{' and '.join(WAN_DIFFUSERS_CLASSES)}), got {type(model).__name__}: "
            f"{refusal(type(model).__name__)}"
        )
    return kind


def from_diffusers(autoencoder_kl) -> VAE | WanVAE:
    """A ``VAE`` with the same config and weights (same dtype and device) as a diffusers
    ``AutoencoderKL`` or ``AutoencoderKLFlux2``; a ``WanVAE`` for an ``AutoencoderKLWan`` or
    ``AutoencoderKLQwenImage``."""
    wan = diffusers_kind(autoencoder_kl, WAN_DIFFUSERS_CLASSES)
    if wan is not None:
        config = WanConfig.from_diffusers({**autoencoder_kl.config, "_class_name": wan})
        p = next(autoencoder_kl.parameters())
        return _build(config, dict(autoencoder_kl.state_dict()), p.dtype, p.device)
    kind = check_diffusers_model(autoencoder_kl)
    config = VAEConfig.from_diffusers(
        {**autoencoder_kl.config, "_class_name": kind}  # the instance's config lacks its name
    )
    sd = convert_state_dict(autoencoder_kl.state_dict(), config)
    p = next(autoencoder_kl.parameters())
    return _build(config, sd, p.dtype, p.device)


def to_diffusers(vae: VAE | WanVAE):
    """A diffusers ``AutoencoderKL`` (``AutoencoderKLFlux2`` for a FLUX.2 config; for a
    ``WanVAE`` its config's ``diffusers_class``) with this VAE's config and weights (needs
    diffusers)."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError("to_diffusers needs diffusers: pip install 'sdvae[test]'") from exc
    if not isinstance(vae, (VAE, WanVAE)):
        raise TypeError(f"vae must be a sdvae.VAE or sdvae.WanVAE, got {type(vae).__name__}")
    p = next(vae.parameters())
    cls = getattr(diffusers, vae.config.diffusers_class, None)
    if cls is None:
        raise ImportError(
            f"to_diffusers: this diffusers ({diffusers.__version__}) has no "
            f"{vae.config.diffusers_class}; upgrade diffusers"
        )
    akl = cls(**vae.config.to_diffusers())
    akl.load_state_dict(vae.state_dict(), strict=True)
    return akl.to(device=p.device, dtype=p.dtype).eval()
