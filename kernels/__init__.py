"""sdvae.kernels: the Triton kernels, one file per op (installed from the top-level
``kernels/`` folder as ``sdvae.kernels``).

Each op file holds the private ``@triton.jit`` kernels, a host launcher that checks its
arguments, and the eager ``<op>_reference`` that tests and benchmarks compare against.
``import sdvae`` does not import this package (nor Triton); the model imports it on first
fused use.

The functions are imported here by name, which also rebinds ``sdvae.kernels.group_norm`` etc.
to the functions rather than to the submodules of the same name.
"""

from .attention import attention, attention_reference
from .group_norm import group_norm, group_norm_reference
from .vae_sample import vae_sample, vae_sample_reference

__all__ = [
    "attention",
    "attention_reference",
    "group_norm",
    "group_norm_reference",
    "vae_sample",
    "vae_sample_reference",
]
