"""sdvae: a drop-in faster Stable Diffusion VAE for NVIDIA GPUs.

>>> import sdvae
>>> vae = sdvae.load("vae.safetensors")          # CompVis or diffusers keys
>>> latents = vae.encode(images)                 # images in [-1, 1], (N, 3, H, W)
>>> images = vae.decode(latents)
"""

from __future__ import annotations

from . import _ext  # noqa: F401  (loads sdvae._C, registering the C++ ops)
from .config import VAEConfig, WanConfig
from .diffusers_patch import patch_diffusers, unpatch_diffusers
from .fast import optimize, unoptimize
from .loading import from_diffusers, load, to_diffusers
from .model import VAE
from .wan import WanVAE

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "VAEConfig",
    "WanConfig",
    "WanVAE",
    "from_diffusers",
    "load",
    "optimize",
    "patch_diffusers",
    "to_diffusers",
    "unoptimize",
    "unpatch_diffusers",
    "__version__",
]


def __getattr__(name):
    # `sdvae.kernels` is a separate package (folder kernels/); import it lazily so that
    # `import sdvae` does not pull in Triton.
    if name == "kernels":
        import importlib

        return importlib.import_module("sdvae.kernels")
    raise AttributeError(f"module 'sdvae' has no attribute {name!r}")
