"""Files in and out for ``sdvae encode`` / ``sdvae decode``: PNG images and safetensors latents.

``encode`` writes one ``<image stem>.safetensors`` per image, holding the scaled latents
(``"latents"``, shape (C, h, w), in the model's dtype) and, as metadata, the source file, its
size and the config's scaling/shift factors. ``decode`` reads such files (or any safetensors
file with a ``latents`` tensor of shape (C, h, w) or (1, C, h, w)) and writes PNGs.
Images of the same size are batched together.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import numpy as np
import torch

__all__ = ["read_image", "write_image", "encode_files", "decode_files"]


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "reading and writing PNG needs Pillow (it comes with matplotlib: "
            "pip install 'sdvae[plot]')"
        ) from exc
    return Image


def read_image(path: str) -> torch.Tensor:
    """An image file -> (3, H, W) float32 in [-1, 1]."""
    image = _pil().open(path).convert("RGB")
    a = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def write_image(t: torch.Tensor, path: str) -> None:
    """(3, H, W) in [-1, 1] -> PNG (clamped, rounded to 8 bits)."""
    a = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    _pil().fromarray(a.permute(1, 2, 0).cpu().numpy()).save(path)


class _Progress:
    def __init__(self, total: int, label: str):
        self.total, self.done, self.label = total, 0, label
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        print(
            ("\r" if self.tty else "") + line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)


def _out_path(out_dir: str, src: str, suffix: str) -> str:
    stem = os.path.splitext(os.path.basename(src))[0]
    return os.path.join(out_dir, stem + suffix)


def _check_inputs(paths, out_dir, suffix):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"inputs not found: {missing}")
    targets = [_out_path(out_dir, p, suffix) for p in paths]
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        raise ValueError(f"two inputs would write the same output file: {dupes}")
    return targets


def _batches(items, key, batch_size):
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


@torch.no_grad()
def encode_files(vae, paths, out_dir, *, batch_size=4, sample=False, seed=None) -> list[str]:
    from safetensors.torch import save_file

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    targets = _check_inputs(paths, out_dir, ".safetensors")
    os.makedirs(out_dir, exist_ok=True)
    p = next(vae.parameters())
    images = [(path, tgt, read_image(path)) for path, tgt in zip(paths, targets)]
    progress = _Progress(len(images), "encode")
    for i, batch in enumerate(_batches(images, lambda it: tuple(it[2].shape), batch_size)):
        x = torch.stack([it[2] for it in batch]).to(p.device, p.dtype)
        if p.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if sample:  # one seed per batch, so batches do not share noise
            lat = vae.encode(x, seed=None if seed is None else seed + i)
        else:
            lat = vae.encode(x, sample=False)
        for (path, tgt, img), z in zip(batch, lat):
            meta = {
                "source": os.path.basename(path),
                "height": str(img.shape[1]),
                "width": str(img.shape[2]),
                "scaling_factor": repr(vae.config.scaling_factor),
                "shift_factor": repr(vae.config.shift_factor),
                "sampled": str(bool(sample)),
            }
            save_file({"latents": z.contiguous().cpu()}, tgt, metadata=meta)
        progress.update(len(batch))
    return targets


@torch.no_grad()
def decode_files(vae, paths, out_dir, *, batch_size=4) -> list[str]:
    from safetensors.torch import load_file

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    targets = _check_inputs(paths, out_dir, ".png")
    os.makedirs(out_dir, exist_ok=True)
    p = next(vae.parameters())
    items = []
    for path, tgt in zip(paths, targets):
        tensors = load_file(path)
        if "latents" not in tensors:
            raise ValueError(f"{path}: no 'latents' tensor (has {sorted(tensors)})")
        z = tensors["latents"]
        if z.dim() == 4 and z.shape[0] == 1:
            z = z[0]
        if z.dim() != 3 or z.shape[0] != vae.config.latent_channels:
            raise ValueError(
                f"{path}: latents must be ({vae.config.latent_channels}, h, w), "
                f"got {tuple(z.shape)}"
            )
        items.append((path, tgt, z))
    progress = _Progress(len(items), "decode")
    for batch in _batches(items, lambda it: tuple(it[2].shape), batch_size):
        z = torch.stack([it[2] for it in batch]).to(p.device, p.dtype)
        for (_, tgt, _), img in zip(batch, vae.decode(z)):
            write_image(img, tgt)
        progress.update(len(batch))
    return targets
