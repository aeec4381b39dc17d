"""``sdvae.optimize``: switch a ``VAE`` onto the fused kernels, in place.

The switch is a set of flags on the reference model's own modules (``GroupNorm.fused``,
``AttentionBlock.fused``, ``Downsample.fused``, ``VAE.fused_sampling``), so there is one model,
never a copy. Each op is switched on only where it can run; otherwise the module stays on
eager PyTorch and the reason is kept in ``vae.fused_reasons`` (``sdvae check`` prints it).

What runs where, once switched:
* GroupNorm (+SiLU) -> ``sdvae.kernels.group_norm(silu=...)``.
* Attention block -> GroupNorm, one q/k/v projection (a single C -> 3C matmul),
  ``sdvae.kernels.attention``, and the output projection with the residual folded into the
  matmul (``addmm``).
* Downsample -> ``sdvae.ops.pad_conv2d`` (no padded copy).
* Encoder sampling -> ``sdvae.kernels.vae_sample``.
On CUDA the model is moved to channels_last, so cuDNN runs its fastest convolutions and the
kernels keep that layout. Each op keeps DESIGN.md's device rules: CPU tensors run the eager
reference unless Triton's interpreter is on.
"""

from __future__ import annotations

import importlib

import torch

from .model import VAE, AttentionBlock, Downsample, GroupNorm

__all__ = ["optimize", "unoptimize", "op_status"]


def _import_reasons(module: str, name: str) -> list[str]:
    try:
        mod = importlib.import_module(module)
        getattr(mod, name)
    except (ImportError, AttributeError) as exc:
        return [f"{module}.{name} is not available: {exc}"]
    return []


def op_status() -> dict[str, list[str]]:
    """For each fused op, the reasons it cannot be used here (empty list: usable)."""
    status = {
        "group_norm": _import_reasons("sdvae.kernels.group_norm", "group_norm"),
        "attention": _import_reasons("sdvae.kernels.attention", "attention"),
        "vae_sample": _import_reasons("sdvae.kernels.vae_sample", "vae_sample"),
        "pad_conv2d": _import_reasons("sdvae.ops", "pad_conv2d"),
    }
    if not status["pad_conv2d"]:
        from . import _ext

        if not _ext.available():
            status["pad_conv2d"].append(_ext.LOAD_ERROR or "sdvae._C is not available")
    return status


def optimize(vae: VAE, *, channels_last: bool | None = None) -> VAE:
    """Switch ``vae`` onto the fused kernels in place and return it.

    ``channels_last=None`` moves the model to channels_last on CUDA and leaves it as it is on
    the CPU.
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae must be a sdvae.VAE, got {type(vae).__name__}")
    status = op_status()
    on = {op: not reasons for op, reasons in status.items()}
    for m in vae.modules():
        if isinstance(m, GroupNorm):
            m.fused = on["group_norm"]
        elif isinstance(m, AttentionBlock):
            m.fused = on["attention"]
        elif isinstance(m, Downsample):
            m.fused = on["pad_conv2d"]
    vae.fused_sampling = on["vae_sample"]
    vae.fused_reasons = {op: r for op, r in status.items() if r}
    if channels_last is None:
        channels_last = next(vae.parameters()).device.type == "cuda"
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    return vae


def unoptimize(vae: VAE) -> VAE:
    """Switch every fused path off again (the weights are untouched)."""
    if not isinstance(vae, VAE):
        raise TypeError(f"vae must be a sdvae.VAE, got {type(vae).__name__}")
    for m in vae.modules():
        if isinstance(m, (GroupNorm, AttentionBlock, Downsample)):
            m.fused = False
    vae.fused_sampling = False
    vae.fused_reasons = {}
    return vae
