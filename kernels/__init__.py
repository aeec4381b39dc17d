"""sdvae.kernels: the Triton kernels, one file per op (installed from the top-level
``kernels/`` folder as ``sdvae.kernels``).

Each op file holds the private ``@triton.jit`` kernels, a host launcher that checks its
arguments, and the eager ``<op>_reference`` that tests and benchmarks compare against.
``import sdvae`` does not import this package (nor Triton); the model imports it on first
fused use, and for the sampling step's reference (``vae_sample_reference``), which the unfused
model runs too. Nothing here imports the rest of ``sdvae``.

Triton is a Linux-only dependency. Without it, ``vae_sample`` and ``rms_norm`` (and their
references) still work (the reference runs, and ``not_supported_reasons`` says why), while
``group_norm`` and ``attention`` (and their references) raise an ImportError that says so.

The functions are imported here by name, which also rebinds ``sdvae.kernels.group_norm`` etc.
to the functions rather than to the submodules of the same name.
"""

from .rms_norm import rms_norm, rms_norm_reference
from .vae_sample import vae_sample, vae_sample_reference

try:
    from .attention import attention, attention_reference
    from .group_norm import group_norm, group_norm_reference
except ImportError as _exc:
    if _exc.name is None or _exc.name.split(".")[0] != "triton":
        raise
    _NO_TRITON = _exc

    def __getattr__(name):
        if name in ("attention", "attention_reference", "group_norm", "group_norm_reference"):
            raise ImportError(
                f"sdvae.kernels.{name} needs Triton, which is not installed ({_NO_TRITON}); "
                "the unfused model (without sdvae.optimize) runs without it"
            )
        raise AttributeError(f"module 'sdvae.kernels' has no attribute {name!r}")


__all__ = [
    "attention",
    "attention_reference",
    "group_norm",
    "group_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "vae_sample",
    "vae_sample_reference",
]
