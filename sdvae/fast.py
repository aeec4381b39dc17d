"""``sdvae.optimize``: switch a ``VAE`` onto the fused kernels, in place.

The switch is a set of flags on the reference model's own modules (``GroupNorm.fused``,
``AttentionBlock.fused``, ``Downsample.fused``, ``VAE.fused_sampling``), so there is one model,
never a copy. Each op is switched on only where it can run; otherwise the module stays on
eager PyTorch and the reason is kept in ``vae.fused_reasons`` (``sdvae check`` prints it):
each module asks its op's ``not_supported_reasons`` about an input of its own shape, device
and dtype (so e.g. an attention block whose head dim the kernel cannot take stays eager, and
on a CPU without Triton's interpreter the Triton ops stay eager, which is what they would run
anyway).

What runs where, once switched:
* GroupNorm (+SiLU) -> ``sdvae.kernels.group_norm(silu=...)``.
* Attention block -> GroupNorm, one q/k/v projection (a single C -> 3C matmul),
  ``sdvae.kernels.attention``, and the output projection with the residual folded into the
  matmul (``addmm``).
* Downsample -> ``sdvae.ops.pad_conv2d`` (no padded copy).
* Every other conv -> ``sdvae.ops.conv2d``: on CUDA one cuDNN graph with the bias and, for
  each residual block's second conv, the residual add in its epilogue (on the CPU only under
  the interpreter, so that the tests run the same wiring; plain CPU keeps ``F.conv2d``).
  The first conv of each residual block runs without its bias, which the next GroupNorm
  adds in its loads, and an upsampler's bias is handed to the block after it
  (``sdvae.execute``).
* Upsample (nearest x2 + 3x3 conv) -> one stride-2 transposed conv with the 3x3 weight folded
  once into a 4x4 one (``sdvae.dispatch.fold_upsample_weight``): exact, 2.25x fewer FLOPs and no
  upsampled copy; on the CPU too (measured on the H200 before it was adopted: 2.1-2.5x per
  layer, 1024^2 decode 38.5 -> 33.9 ms, error unchanged).
* Encoder sampling -> ``sdvae.kernels.vae_sample`` (for FLUX.2 with per-channel scale and
  shift: the latent normalization, see ``sdvae.model``).
With ``cuda_graph=True`` the encoder and decoder are replayed from CUDA graphs
(``sdvae.graphs``). On CUDA the model is moved to channels_last, so cuDNN runs its fastest
convolutions and the kernels keep that layout. Each op keeps DESIGN.md's device rules: CPU
tensors run the eager reference unless Triton's interpreter is on.
"""

from __future__ import annotations

import torch

from . import dispatch, wan
from .dispatch import op_status
from .model import VAE, AttentionBlock, Conv2d, Downsample, GroupNorm, Upsample

__all__ = ["optimize", "unoptimize", "op_status", "module_reasons"]


def module_reasons(module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why ``module`` (a GroupNorm, AttentionBlock, Downsample or Conv2d of the model) cannot
    run its fused op on ``device``/``dtype`` ([] when it can): ``sdvae.dispatch``'s reasons
    for an input of the module's shape."""
    if isinstance(module, GroupNorm):
        return dispatch.group_norm_reasons(
            module.num_channels, module.num_groups, module.weight, module.bias, module.eps,
            silu=module.silu, device=device, dtype=dtype,
        )  # fmt: skip
    if isinstance(module, AttentionBlock):
        c = module.to_q.in_features
        return dispatch.attention_reasons(1, c, c**-0.5, device=device, dtype=dtype)
    if isinstance(module, Downsample):
        conv = module.conv
        return dispatch.conv_reasons(conv.weight, conv.bias, device=device, dtype=dtype,
                                     padded=True)  # fmt: skip
    if isinstance(module, Conv2d):
        return dispatch.conv_reasons(module.weight, module.bias, device=device, dtype=dtype)
    raise TypeError(f"no fused op for {type(module).__name__}")


def optimize(vae: VAE | wan.WanVAE, *, channels_last: bool | None = None,
             cuda_graph: bool = False) -> VAE | wan.WanVAE:  # fmt: skip
    """Switch ``vae`` onto the fused kernels in place and return it.

    Call it after moving the model to its device and dtype: each module is switched on only
    where its op runs the fused kernel there (``vae.fused_reasons`` lists the others and why).
    ``channels_last=None`` moves the model to channels_last on CUDA and leaves it as it is on
    the CPU. ``cuda_graph=True`` also replays the encoder and the decoder from CUDA graphs,
    one captured per input shape (``sdvae.graphs``); on a model that is not on CUDA it stays
    off, with the reason in ``vae.fused_reasons["cuda_graph"]``. Calling ``optimize`` again
    drops any graphs captured so far.

    A ``WanVAE`` (the Wan video family) is switched the same way (``optimize_wan``); its
    graphs replay the whole chunked encode or decode, one per input shape.
    """
    if isinstance(vae, wan.WanVAE):
        optimize_wan(vae, channels_last=channels_last)
    elif not isinstance(vae, VAE):
        raise TypeError(f"vae must be a sdvae.VAE or sdvae.WanVAE, got {type(vae).__name__}")
    else:
        _optimize_vae(vae, channels_last)
    vae.disable_cuda_graphs()
    if cuda_graph:
        from .graphs import graph_reasons, hook_reasons

        why = graph_reasons(next(vae.parameters()).device) + hook_reasons(vae)
        if why:
            vae.fused_reasons["cuda_graph"] = why
        else:
            vae.enable_cuda_graphs()
    return vae


def _optimize_vae(vae: VAE, channels_last: bool | None) -> None:
    p = next(vae.parameters())
    status = op_status()
    reasons: dict[str, list[str]] = {op: list(r) for op, r in status.items() if r}
    kinds = {
        GroupNorm: "group_norm",
        AttentionBlock: "attention",
        Downsample: "pad_conv2d",
        Conv2d: "conv2d",
    }
    for m in vae.modules():
        op = kinds.get(type(m))
        if op is None:
            continue
        why = status[op] or module_reasons(m, p.device, p.dtype)
        m.fused = not why
        for r in why:
            if r not in reasons.setdefault(op, []):
                reasons[op].append(r)
    if not status["vae_sample"]:
        why = dispatch.sample_reasons(vae.config.latent_channels, device=p.device, dtype=p.dtype)
        if why:
            reasons.setdefault("vae_sample", []).extend(why)
    vae.fused_sampling = "vae_sample" not in reasons
    vae.fused_reasons = reasons
    if channels_last is None:
        channels_last = p.device.type == "cuda"
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    vae.memory_format = torch.channels_last if channels_last else None
    for m in vae.modules():
        if isinstance(m, Upsample):  # plain torch ops: runs wherever the model runs
            m.fused = True
            m.fold()


def wan_module_reasons(module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why a ``WanVAE`` module cannot run its fused op on ``device``/``dtype`` ([]: it can)."""
    if isinstance(module, wan.RMSNorm):
        return dispatch.rms_norm_reasons(module.gamma.numel(), module.gamma, silu=module.silu,
                                         device=device, dtype=dtype)  # fmt: skip
    if isinstance(module, wan.AttentionBlock):
        c = module.proj.in_channels
        return dispatch.attention_reasons(1, c, c**-0.5, device=device, dtype=dtype)
    if isinstance(module, wan.Resample) and module.mode.startswith("downsample"):
        conv = module.resample[1]
        return dispatch.conv_reasons(conv.weight, conv.bias, device=device, dtype=dtype,
                                     padded=True)  # fmt: skip
    if isinstance(module, wan.Resample) and dtype in (torch.float16, torch.bfloat16):
        return [
            f"{str(dtype).replace('torch.', '')}: the folded 4x4 upsampler weight is rounded "
            "once more than diffusers' 3x3 one (on the tests' model +7% fp16 decode error), "
            "so the upsampler runs nearest x2 + conv, as diffusers does"
        ]
    return []  # plain torch ops (frame buffers, the folded upsampler): wherever torch runs


_WAN_OPS = {
    wan.RMSNorm: "rms_norm",
    wan.AttentionBlock: "attention",
    wan.CausalConv3d: None,
}


def optimize_wan(vae: wan.WanVAE, *, channels_last: bool | None = None) -> wan.WanVAE:
    """``optimize`` for the Wan family, in place:

    * RMS norm (+SiLU) -> ``sdvae.kernels.rms_norm``, written straight into the next causal
      conv's frame buffer;
    * causal 3-D convs -> one frame buffer per call (kept frames, then the new ones), no
      ``torch.cat`` and no padded copy;
    * attention -> ``sdvae.kernels.attention`` per frame, the output projection with the
      residual in one ``addmm``;
    * the spatial upsamplers -> the folded transposed conv in fp32 (in fp16/bf16 the folded
      weight's extra rounding made the decode's error larger than diffusers': there they run
      nearest x2 + conv); the downsamplers -> ``sdvae.ops.pad_conv2d``.

    ``channels_last=None``: channels_last_3d on CUDA (cuDNN's fast 3-D layout; the frames of
    a chunk are then contiguous blocks), as it is on the CPU. The reasons an op stays eager
    are in ``vae.fused_reasons``."""
    p = next(vae.parameters())
    status = op_status()
    reasons: dict[str, list[str]] = {}
    for m in vae.modules():
        if isinstance(m, wan.Resample):
            op = "pad_conv2d" if m.mode.startswith("downsample") else "upsample_fold"
        elif type(m) in _WAN_OPS:
            op = _WAN_OPS[type(m)]
        else:
            continue
        why = status.get(op, []) or wan_module_reasons(m, p.device, p.dtype)
        m.fused = not why
        for r in why:
            if r not in reasons.setdefault(op, []):
                reasons[op].append(r)
        if isinstance(m, wan.Resample) and m.fused and m.mode.startswith("upsample"):
            m.fold()
    vae.fused_reasons = reasons
    if channels_last is None:
        channels_last = p.device.type == "cuda"
    if channels_last:  # the 3-D convs' weights channels_last_3d, the per-frame 2-D ones'
        for m in vae.modules():  # channels_last (torch's .to takes one format for all ranks)
            if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                m.to(memory_format=fmt)
    vae.memory_format = torch.channels_last_3d if channels_last else None
    return vae


def unoptimize(vae: VAE | wan.WanVAE) -> VAE | wan.WanVAE:
    """Switch every fused path off again (the weights are untouched)."""
    if not isinstance(vae, (VAE, wan.WanVAE)):
        raise TypeError(f"vae must be a sdvae.VAE or sdvae.WanVAE, got {type(vae).__name__}")
    for m in vae.modules():
        if hasattr(m, "fused"):  # every module with a fused op, of either family
            m.fused = False
    if isinstance(vae, VAE):
        vae.fused_sampling = False
    vae.fused_reasons, vae.memory_format = {}, None
    vae.disable_cuda_graphs()
    return vae
