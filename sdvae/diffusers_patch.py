"""``sdvae.patch_diffusers``: the fused kernels inside a stock diffusers ``AutoencoderKL``.

FLUX.2's ``AutoencoderKLFlux2`` has the same encoder and decoder blocks and is patched the
same way (its pipeline normalizes the latents itself, with ``vae.bn``'s statistics). The Wan
family's ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` are patched by ``_patch_wan`` (at
the end of this file). Any other diffusers autoencoder is refused with a TypeError saying why.

A pipeline user's whole change is ``sdvae.patch_diffusers(pipe.vae)``. The patch is made on
the instance (never on diffusers' classes, so other models are untouched) and
``sdvae.unpatch_diffusers`` restores every original:

* ``ResnetBlock2D``: GroupNorm+SiLU through ``group_norm(silu=True)`` (the VAE's blocks have
  no time embedding, no up/down sampling inside and output scale 1; any other block is left
  alone).
* The encoder's and decoder's closing ``conv_norm_out`` + SiLU: one fused ``group_norm``.
* The mid-block attention: an attention processor with one fused q/k/v projection and
  ``sdvae.kernels.attention``; calls it does not cover (masks, cross-attention) go to the
  processor it replaced.
* ``Downsample2D`` with the asymmetric pad: ``sdvae.ops.pad_conv2d``.
* ``Upsample2D`` (nearest x2 + 3x3 conv): one stride-2 transposed conv with the folded 4x4
  weight, as ``sdvae.optimize`` does (``sdvae.dispatch.upsample``; a call with an
  ``output_size`` other than twice the input goes to the original forward).
* On CUDA the model is moved to channels_last (``channels_last=None``), as ``sdvae.optimize``
  does: cuDNN's fastest convolutions and the kernels' fast layout.
* ``encode(...).latent_dist``: a distribution whose ``sample(generator)`` is one
  ``vae_sample`` kernel (noise drawn in-kernel from a seed taken from ``generator``).

``enable_slicing()`` keeps working: it calls the same patched modules. ``enable_tiling()``
runs sdvae's exact streamed path instead of diffusers' blended tiles (``sdvae.budget``): the
same output as the untiled model, the full path when it fits the budget
(``patch_diffusers(max_memory=...)``, or the ``sdvae_max_memory`` attribute; default: the
device's free memory), else the streamed one (``offload=`` / ``sdvae_offload``). That is an
inference path: a call that autograd records (grad mode on, and the input or the weights
require grad) runs the tiled method the patch replaced instead -- diffusers' own blended
tiles, differentiable -- with a one-time warning saying so.

Weights on the meta device (a model built under accelerate's ``init_empty_weights`` or
``torch.device("meta")``, whose weights arrive later through ``load_state_dict(...,
assign=True)``): nothing is computed from them. Each op's blocks stay stock, with the reason
in ``_sdvae_reasons`` (patch after loading to get the kernels); the upsamplers, which need no
kernel, are patched and fold at their first call on real weights, and refold whenever the
conv weight is changed, replaced, moved or cast (``sdvae.dispatch.fold_is_current``).

accelerate's hooks (``cpu_offload``, ``enable_sequential_cpu_offload``, ``dispatch_model``)
bring a module's weights to its execution device when the module is called. The patched
forwards read some submodules' weights without calling them (a GroupNorm's affine, a conv's
weight, the q/k/v projections), so they run those submodules' hooks around the read
(``_weights_of``); a patched module that already has a hook gets the new forward beneath it.
Patch before enabling sequential CPU offload: its weights live on the meta device between
calls. ``enable_model_cpu_offload`` moves the whole model at each call, which refolds the
upsamplers.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as F

from . import dispatch, steps, wan
from .config import WAN_DIFFUSERS_CLASSES
from .dispatch import weights_of
from .loading import check_diffusers_model, diffusers_kind

__all__ = ["patch_diffusers", "unpatch_diffusers", "is_patched", "is_patched_module", "lower"]

_ORIG = "_sdvae_original_forward"
_MINE = "_sdvae_forward"


def _set_forward(module, fn) -> None:
    """Make ``fn`` the module's forward; beneath an accelerate hook when the module has one
    (accelerate's wrapper calls ``_old_forward``), so that the hook still runs around it."""
    hooked = hasattr(module, "_hf_hook") and "_old_forward" in vars(module)
    slot = "_old_forward" if hooked else "forward"
    mine = types.MethodType(fn, module)
    setattr(module, _ORIG, getattr(module, slot))
    setattr(module, slot, mine)
    setattr(module, _MINE, mine)


def _restore_forward(module) -> None:
    """Undo ``_set_forward``, wherever the patched forward sits now (an accelerate hook may
    have been added or removed since)."""
    orig, mine = vars(module).pop(_ORIG), vars(module).pop(_MINE)
    for slot in ("_old_forward", "forward"):
        if vars(module).get(slot) is mine:
            cls_forward = getattr(orig, "__func__", None) is type(module).forward
            if slot == "forward" and cls_forward and getattr(orig, "__self__", None) is module:
                del module.forward  # the class's forward shows through again
            else:
                setattr(module, slot, orig)


def _diffusers():
    try:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D
    except ImportError as exc:  # pragma: no cover - diffusers is an optional extra
        raise ImportError("patch_diffusers needs diffusers: pip install diffusers") from exc
    return Attention, DiagonalGaussianDistribution, Downsample2D, ResnetBlock2D, Upsample2D


def _gn(norm, x, silu):
    return dispatch.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu,
                               fused=True)  # fmt: skip


def _resnet_forward(self, input_tensor, temb=None, *args, **kwargs):
    with weights_of(self.norm1):
        h = _gn(self.norm1, input_tensor, True)
    h = self.conv1(h)
    with weights_of(self.norm2):
        h = _gn(self.norm2, h, True)
    h = self.conv2(self.dropout(h))
    x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return x + h


def _resnet_supported(block) -> bool:
    return (
        block.time_emb_proj is None
        and block.upsample is None
        and block.downsample is None
        and block.output_scale_factor == 1.0
        and isinstance(block.nonlinearity, torch.nn.SiLU)
        and isinstance(block.norm1, torch.nn.GroupNorm)
        and isinstance(block.norm2, torch.nn.GroupNorm)
    )


def _gn_silu_forward(self, x):
    return _gn(self, x, True)


def _downsample_forward(self, hidden_states, *args, **kwargs):
    with weights_of(self.conv):
        return dispatch.pad_conv2d(hidden_states, self.conv.weight, self.conv.bias, fused=True)


def _upsample_supported(up) -> bool:
    conv = getattr(up, "conv", None)
    return (
        up.use_conv
        and not up.use_conv_transpose
        and up.interpolate
        and up.norm is None
        and up.name == "conv"
        and isinstance(conv, torch.nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.in_channels == up.channels
    )


def _upsample_forward(self, hidden_states, output_size=None, *args, **kwargs):
    if output_size is not None and tuple(output_size) != tuple(
        2 * s for s in hidden_states.shape[-2:]
    ):
        return getattr(self, _ORIG)(hidden_states, output_size, *args, **kwargs)
    with weights_of(self.conv):
        return dispatch.upsample(self, self.conv, hidden_states)


class FusedAttnProcessor:
    """Self-attention of the VAE's mid block on sdvae's kernels; other calls go to ``fallback``."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or hidden_states.dim() != 4
            or attn.spatial_norm is not None
            or attn.group_norm is None
            or attn.norm_q is not None
            or attn.norm_k is not None
        ):
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        with weights_of(attn.group_norm):
            t = _gn(attn.group_norm, hidden_states, False)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
        with weights_of(attn.to_q, attn.to_k, attn.to_v):
            w_qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
            b_qkv = None
            if attn.to_q.bias is not None:
                b_qkv = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
        q, k, v = F.linear(t, w_qkv, b_qkv).split(attn.inner_dim, dim=-1)
        heads = attn.heads
        d = attn.inner_dim // heads

        def split_heads(u):
            return u.reshape(b, h * w, heads, d).transpose(1, 2).contiguous()  # (B, H, L, d)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        o = dispatch.attention(q, k, v, scale=attn.scale, fused=True)
        o = o.transpose(1, 2).reshape(b, h * w, attn.inner_dim)
        o = attn.to_out[1](attn.to_out[0](o))
        o = o.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


def _fused_distribution_class(base):
    class FusedDiagonalGaussian(base):
        """diffusers' DiagonalGaussianDistribution whose ``sample`` is one fused kernel."""

        def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
            from . import kernels

            seed = None
            if generator is not None:
                seed = int(
                    torch.randint(
                        0, 2**62, (1,), generator=generator, device=generator.device
                    ).item()
                )
            return kernels.vae_sample(
                self.parameters, None, scaling_factor=1.0, shift_factor=0.0, seed=seed, sample=True
            )

    return FusedDiagonalGaussian


def _encode_wrapper(akl, original, dist_cls):
    def encode(self, x, return_dict: bool = True):
        out = original(x, return_dict=True)
        dist = out.latent_dist
        fused = dist_cls.__new__(dist_cls)
        fused.__dict__.update(dist.__dict__)
        if return_dict:
            out.latent_dist = fused
            return out
        return (fused,)

    return types.MethodType(encode, akl)


def is_patched(autoencoder_kl) -> bool:
    return bool(getattr(autoencoder_kl, "_sdvae_patched", False))


def is_patched_module(module) -> bool:
    """Whether ``module`` (a block of a diffusers autoencoder) runs a forward of the patch."""
    return _ORIG in module.__dict__


class _Usable:
    """Asks each op's ``not_supported_reasons`` about an input of a block's own shape, on the
    model's device and dtype, and collects the reasons of the blocks left stock."""

    def __init__(self, device, dtype):
        self.status = dispatch.op_status()
        if device.type == "meta":
            why = (
                "the weights were on the meta device when patched (built empty, or offloaded "
                "by accelerate): patch after loading them, before enabling CPU offload"
            )
            self.status = {op: [*r, why] for op, r in self.status.items()}
        self.device, self.dtype = device, dtype
        self.reasons: dict[str, list[str]] = {op: list(r) for op, r in self.status.items() if r}

    def __call__(self, op: str, why_fn) -> bool:
        if self.status[op]:
            return False
        with torch.no_grad():
            why = why_fn()
        for r in why:
            if r not in self.reasons.setdefault(op, []):
                self.reasons[op].append(r)
        return not why

    def group_norm(self, norm):
        return dispatch.group_norm_reasons(norm.num_channels, norm.num_groups, norm.weight,
                                           norm.bias, norm.eps, silu=False, device=self.device,
                                           dtype=self.dtype)  # fmt: skip

    def attention(self, attn):
        d = attn.inner_dim // attn.heads
        return dispatch.attention_reasons(attn.heads, d, attn.scale, device=self.device,
                                          dtype=self.dtype)  # fmt: skip

    def pad_conv2d(self, conv):
        return dispatch.conv_reasons(conv.weight, conv.bias, device=self.device,
                                     dtype=self.dtype, padded=True)  # fmt: skip

    def vae_sample(self, latent_channels):
        return dispatch.sample_reasons(latent_channels, device=self.device, dtype=self.dtype)


_GRAD_WARNED = False


def _diffusers_tiles(self, x, name: str, *args, **kwargs):
    """Whether autograd records this call; then the result of diffusers' own ``name`` (the
    tiled method the patch replaced), warned once per process: the streamed path is an
    inference path (it writes bands in place), so with autograd the blended tiles run."""
    from .budget import records_grad

    if not records_grad(x, self):
        return False, None
    global _GRAD_WARNED
    if not _GRAD_WARNED:
        _GRAD_WARNED = True
        warnings.warn(
            "sdvae: enable_tiling() on a patched model runs sdvae's exact streamed path for "
            "inference only; this call is recorded by autograd (grad mode is on and the input "
            "or the weights require grad), so diffusers' own tiled method runs (blended tiles, "
            "not equal to the untiled model). Call it under torch.no_grad() or "
            "torch.inference_mode() for the exact path.",
            UserWarning,
            stacklevel=4,
        )
    return True, getattr(type(self), name)(self, x, *args, **kwargs)


def _tiled_decode(self, z, return_dict: bool = True):
    from diffusers.models.autoencoders.vae import DecoderOutput

    from .budget import diffusers_decode

    hit, out = _diffusers_tiles(self, z, "tiled_decode", return_dict=return_dict)
    if hit:
        return out
    dec = diffusers_decode(self, z)
    return DecoderOutput(sample=dec) if return_dict else (dec,)


def _tiled_moments(self, x):
    from .budget import diffusers_moments

    hit, out = _diffusers_tiles(self, x, "_tiled_encode")
    return out if hit else diffusers_moments(self, x)


def _tiled_encode(self, x, return_dict: bool = True):
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    hit, out = _diffusers_tiles(self, x, "tiled_encode", return_dict=return_dict)
    if hit:
        return out
    posterior = DiagonalGaussianDistribution(_tiled_moments(self, x))
    return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


_TILED = {"tiled_decode": _tiled_decode, "_tiled_encode": _tiled_moments,
          "tiled_encode": _tiled_encode}  # fmt: skip


# ------------------------------------------------------------------ lowering (sdvae.steps)
def _is_diffusers_part(part) -> bool:
    return type(part).__name__ in ("Encoder", "Decoder") and not type(part).__module__.startswith(
        "sdvae."
    )


def lower(part, rd: steps.Reader) -> steps.Lowered:
    """A diffusers ``Encoder`` / ``Decoder`` (of ``AutoencoderKL`` or ``AutoencoderKLFlux2``),
    stock or patched, as step records (``sdvae.steps``): the live parameters, and fused where
    the patch put a fused forward. ValueError for options the VAE does not use."""
    kind = {"Encoder": "encoder", "Decoder": "decoder"}[type(part).__name__]
    act = getattr(part, "_sdvae_original_act", getattr(part, "conv_act", None))
    if not isinstance(act, torch.nn.SiLU):
        raise ValueError(f"{kind}.conv_act must be SiLU, got {type(act).__name__}")
    if getattr(part, "mid_block", None) is None:
        raise ValueError(f"{kind} without a mid block is not supported")

    def res(block, name) -> steps.Resnet:
        if not _resnet_supported(block):
            raise ValueError(f"{name}: a ResnetBlock2D with options the VAE does not use")
        fused = is_patched_module(block)
        sc = block.conv_shortcut
        return steps.Resnet(
            name,
            rd.norm(block.norm1, fused, f"{name}.norm1"),
            rd.conv(block.conv1, 3, f"{name}.conv1"),
            rd.norm(block.norm2, fused, f"{name}.norm2"),
            rd.conv(block.conv2, 3, f"{name}.conv2"),
            None if sc is None else rd.conv(sc, 1, f"{name}.conv_shortcut"),
            block.conv1.in_channels,
            block.conv1.out_channels,
        )

    def attn(a, name) -> steps.Attention:
        if (
            a.group_norm is None
            or a.spatial_norm is not None
            or a.norm_q is not None
            or a.norm_k is not None
            or a.is_cross_attention
        ):
            raise ValueError(f"{name}: an attention with options the VAE does not use")
        fused = isinstance(a.processor, FusedAttnProcessor)
        return steps.Attention(
            name, rd.norm(a.group_norm, fused, f"{name}.group_norm"),
            rd.t(a.to_q.weight), rd.t(a.to_q.bias), rd.t(a.to_k.weight), rd.t(a.to_k.bias),
            rd.t(a.to_v.weight), rd.t(a.to_v.bias), rd.t(a.to_out[0].weight),
            rd.t(a.to_out[0].bias), a.heads, a.scale if fused else None,
            bool(a.residual_connection), float(a.rescale_output_factor),
            rd.fused(fused), a.to_q.in_features,
        )  # fmt: skip

    def up(u, name) -> steps.Upsample:
        if not _upsample_supported(u):
            raise ValueError(f"{name}: an Upsample2D with options the VAE does not use")
        return steps.upsample_record(u, name, rd, is_patched_module(u))

    def down(d, name) -> steps.Downsample:
        if not (d.use_conv and d.padding == 0 and d.norm is None):
            raise ValueError(f"{name}: a Downsample2D with options the VAE does not use")
        conv = rd.conv(d.conv, 3, f"{name}.conv", stride=2, padding=0,
                       fused=is_patched_module(d))  # fmt: skip
        return steps.Downsample(name, conv, d.conv.in_channels)

    out_fused = is_patched_module(part.conv_norm_out)
    found = steps.walk(part, kind, rd, res=res, attn=attn, up=up, down=down, out_fused=out_fused)
    patched = any(is_patched_module(b) for b in part.mid_block.resnets)
    return steps.Lowered(kind, found, part.conv_in.in_channels,
                         "patched" if patched else "stock")  # fmt: skip


steps.register(_is_diffusers_part, lower)


def patch_diffusers(
    autoencoder_kl,
    *,
    channels_last: bool | None = None,
    max_memory=None,
    offload: str | None = None,
):
    """Put sdvae's kernels inside a diffusers ``AutoencoderKL`` in place; returns it.

    Call it after moving the model to its device and dtype: each block is patched only where
    its op runs the fused kernel there; ``autoencoder_kl._sdvae_reasons`` lists the others.
    ``channels_last=None`` moves the model to channels_last on CUDA (as ``sdvae.optimize``)
    and leaves it as it is on the CPU; ``unpatch_diffusers`` does not move it back.

    With ``enable_tiling()`` the model decodes and encodes exactly (sdvae's streamed path, no
    blended tiles) within ``max_memory`` (bytes or e.g. ``"6GiB"``; kept in the
    ``sdvae_max_memory`` attribute, None: the device's free memory at each call), stored
    activations in host memory with ``offload="cpu"`` (``sdvae_offload``)."""
    from .budget import check_offload, parse_memory

    budget, offload = parse_memory(max_memory), check_offload(offload)
    if diffusers_kind(autoencoder_kl, WAN_DIFFUSERS_CLASSES) is not None:
        if budget is not None or offload is not None:
            raise ValueError(
                "max_memory / offload: not available through the patch for the Wan family (its "
                "decode already runs one latent frame at a time; diffusers' frame caches have no "
                "bands): sdvae.from_diffusers(vae) gives a WanVAE whose encode/decode take "
                "max_memory / offload"
            )
        return _patch_wan(autoencoder_kl, channels_last)
    Attention, DiagonalGaussian, Downsample2D, ResnetBlock2D, Upsample2D = _diffusers()
    check_diffusers_model(autoencoder_kl)  # AutoencoderKL or AutoencoderKLFlux2
    if is_patched(autoencoder_kl):
        autoencoder_kl.sdvae_max_memory, autoencoder_kl.sdvae_offload = budget, offload
        return autoencoder_kl
    p = next(autoencoder_kl.parameters())
    usable = _Usable(p.device, p.dtype)
    patched = []
    for module in autoencoder_kl.modules():
        if (
            isinstance(module, ResnetBlock2D)
            and _resnet_supported(module)
            and usable(
                "group_norm",
                lambda m=module: usable.group_norm(m.norm1) + usable.group_norm(m.norm2),
            )
        ):
            _set_forward(module, _resnet_forward)
            patched.append(module)
        elif (
            isinstance(module, Downsample2D)
            and module.use_conv
            and module.padding == 0
            and module.norm is None
            and usable("pad_conv2d", lambda m=module: usable.pad_conv2d(m.conv))
        ):
            _set_forward(module, _downsample_forward)
            patched.append(module)
        elif isinstance(module, Upsample2D) and _upsample_supported(module):
            # Plain torch ops (cuDNN's transposed conv): runs wherever the model runs. The fold
            # is made here when the weights are real, else at the first call.
            _set_forward(module, _upsample_forward)
            patched.append(module)
        elif isinstance(module, Attention) and usable(
            "attention", lambda m=module: usable.attention(m)
        ):
            module._sdvae_original_processor = module.processor
            module.set_processor(FusedAttnProcessor(module.processor))
            patched.append(module)
    for part in (autoencoder_kl.encoder, autoencoder_kl.decoder):
        norm = part.conv_norm_out
        if (
            isinstance(part.conv_act, torch.nn.SiLU)
            and isinstance(norm, torch.nn.GroupNorm)
            and usable("group_norm", lambda n=norm: usable.group_norm(n))
        ):
            _set_forward(norm, _gn_silu_forward)
            part._sdvae_original_act, part._sdvae_act_name = part.conv_act, "conv_act"
            part.conv_act = torch.nn.Identity()
            patched.append(norm)
    latent_channels = autoencoder_kl.config.latent_channels
    if usable("vae_sample", lambda: usable.vae_sample(latent_channels)):
        autoencoder_kl._sdvae_original_encode = autoencoder_kl.encode
        autoencoder_kl.encode = _encode_wrapper(
            autoencoder_kl, autoencoder_kl.encode, _fused_distribution_class(DiagonalGaussian)
        )
    for name, fn in _TILED.items():
        if hasattr(type(autoencoder_kl), name):
            setattr(autoencoder_kl, name, types.MethodType(fn, autoencoder_kl))
    autoencoder_kl.sdvae_max_memory, autoencoder_kl.sdvae_offload = budget, offload
    autoencoder_kl._sdvae_patched = patched
    autoencoder_kl._sdvae_reasons = usable.reasons
    if channels_last is None:
        channels_last = p.device.type == "cuda"
    if channels_last:
        autoencoder_kl.to(memory_format=torch.channels_last)
    for module in patched:
        if isinstance(module, Upsample2D):
            dispatch.refold_upsample(module, module.conv)
    return autoencoder_kl


def unpatch_diffusers(autoencoder_kl):
    """Undo ``patch_diffusers``; returns the model."""
    if not is_patched(autoencoder_kl):
        return autoencoder_kl
    for module in autoencoder_kl._sdvae_patched:
        if hasattr(module, "_sdvae_original_processor"):
            module.set_processor(module._sdvae_original_processor)
            del module._sdvae_original_processor
        if _ORIG in module.__dict__:
            _restore_forward(module)
        for name in ("folded_weight", "_folded_from"):  # the upsamplers' fold
            module.__dict__.pop(name, None)
    for module in autoencoder_kl.modules():
        if hasattr(module, "_sdvae_original_act"):  # conv_act (SD), nonlinearity (Wan)
            setattr(module, module._sdvae_act_name, module._sdvae_original_act)
            del module._sdvae_original_act, module._sdvae_act_name
        module.__dict__.pop("_sdvae_silu", None)
    if hasattr(autoencoder_kl, "_sdvae_original_encode"):
        del autoencoder_kl.encode
        del autoencoder_kl._sdvae_original_encode
    for name in list(_TILED) + ["sdvae_max_memory", "sdvae_offload"]:
        autoencoder_kl.__dict__.pop(name, None)
    del autoencoder_kl._sdvae_patched
    autoencoder_kl._sdvae_reasons = {}
    return autoencoder_kl


# ---------------------------------------------------------------------------- Wan family
def _wan_classes():
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as q
    from diffusers.models.autoencoders import autoencoder_kl_wan as w

    return types.SimpleNamespace(
        norm=(w.WanRMS_norm, q.QwenImageRMS_norm),
        block=(w.WanResidualBlock, q.QwenImageResidualBlock),
        attention=(w.WanAttentionBlock, q.QwenImageAttentionBlock),
        resample=(w.WanResample, q.QwenImageResample),
        parts=(w.WanEncoder3d, w.WanDecoder3d, q.QwenImageEncoder3d, q.QwenImageDecoder3d),
    )


def _wan_norm_supported(norm) -> bool:
    """A channel-first RMS norm without a bias (diffusers' default ``bias=0.0``)."""
    return norm.channel_first and not isinstance(norm.bias, torch.Tensor)


def _wan_norm_forward(self, x):
    """``WanRMS_norm`` on ``sdvae.kernels.rms_norm``, with the SiLU that follows it in its
    block when the patch folded that in (``_sdvae_silu``)."""
    return dispatch.rms_norm(x, self.gamma, silu=self.__dict__.get("_sdvae_silu", False),
                             fused=True)  # fmt: skip


def _wan_attention_forward(self, x):
    """``WanAttentionBlock`` on ``sdvae.wan.fused_attention`` (the attention kernel per
    frame)."""
    b, c, t, h, w = x.shape
    f = x.transpose(1, 2).reshape(b * t, c, h, w)
    with weights_of(self.norm, self.to_qkv, self.proj):
        qkv, proj = self.to_qkv, self.proj
        return wan.fused_attention(x, f, self.norm.gamma, qkv.weight, qkv.bias, proj.weight,
                                   proj.bias)  # fmt: skip


def _wan_down_forward(self, x):
    """The downsampler's ``ZeroPad2d((0, 1, 0, 1))`` + stride-2 conv as one
    ``sdvae.ops.pad_conv2d``."""
    conv = self[1]
    with weights_of(conv):
        return dispatch.pad_conv2d(x, conv.weight, conv.bias, fused=True, padding=(0, 1, 0, 1))


def _wan_up_forward(self, x):
    """Nearest x2 + 3x3 conv as the folded transposed conv (fp32 and float64 only)."""
    with weights_of(self[1]):
        return dispatch.upsample(self, self[1], x)


def _wan_untiled(self, name: str, *args, **kwargs):
    """``enable_tiling()`` on a patched Wan model: the exact ``_encode`` / ``_decode``
    (diffusers' own chunked, untiled ones: one latent frame at a time), not blended tiles."""
    tiling, self.use_tiling = self.use_tiling, False
    try:
        return getattr(self, name)(*args, **kwargs)
    finally:
        self.use_tiling = tiling


def _patch_wan(akl, channels_last: bool | None):
    """``patch_diffusers`` for ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage``: diffusers'
    own forwards (its chunking and frame caches) with these leaves on sdvae's ops:

    * ``WanRMS_norm`` -> ``sdvae.kernels.rms_norm``, with the SiLU after it folded in (the
      block's ``nonlinearity`` becomes an identity);
    * ``WanAttentionBlock`` -> the attention kernel per frame, projections in one matmul each;
    * the downsamplers' pad + stride-2 conv -> ``sdvae.ops.pad_conv2d``;
    * the upsamplers' nearest x2 + conv -> the folded transposed conv, in fp32/float64 only
      (in fp16/bf16 its extra weight rounding costs accuracy: ``sdvae.fast.optimize_wan``);
    * ``enable_tiling()`` -> the exact untiled path.

    The causal convs keep diffusers' ``torch.cat`` + ``F.pad`` (``sdvae.optimize`` on a
    ``WanVAE`` removes both)."""
    if channels_last:  # refused before anything is patched
        raise ValueError("channels_last=True: not available for the Wan family's diffusers "
                         "classes (their causal convs copy into contiguous tensors)")  # fmt: skip
    if is_patched(akl):
        return akl
    cls = _wan_classes()
    p = next(akl.parameters())
    usable = _Usable(p.device, p.dtype)
    patched: list = []

    def norm_ok(norm) -> bool:
        return _wan_norm_supported(norm) and usable(
            "rms_norm",
            lambda: dispatch.rms_norm_reasons(
                norm.gamma.numel(), norm.gamma, silu=True, device=p.device, dtype=p.dtype
            ),  # fmt: skip
        )

    def patch_norm(norm, silu: bool) -> None:
        _set_forward(norm, _wan_norm_forward)
        norm._sdvae_silu = silu
        patched.append(norm)

    def fold_act(owner, norms) -> None:
        """Each of ``norms`` (followed by ``owner.nonlinearity``, a SiLU) with the SiLU in."""
        if not isinstance(owner.nonlinearity, torch.nn.SiLU) or not all(map(norm_ok, norms)):
            return
        for norm in norms:
            patch_norm(norm, True)
        owner._sdvae_original_act, owner._sdvae_act_name = owner.nonlinearity, "nonlinearity"
        owner.nonlinearity = torch.nn.Identity()

    half = p.dtype in (torch.float16, torch.bfloat16)
    ups: list = []
    for module in akl.modules():
        if isinstance(module, cls.block):
            fold_act(module, (module.norm1, module.norm2))
        elif isinstance(module, cls.parts):
            fold_act(module, (module.norm_out,))
        elif isinstance(module, cls.attention) and usable(
            "attention",
            lambda d=module.dim: dispatch.attention_reasons(
                1, d, d**-0.5, device=p.device, dtype=p.dtype
            ),  # fmt: skip
        ):
            _set_forward(module, _wan_attention_forward)
            patched.append(module)
        elif isinstance(module, cls.resample) and module.mode.startswith("downsample"):
            conv = module.resample[1]
            if usable("pad_conv2d", lambda c=conv: usable.pad_conv2d(c)):
                _set_forward(module.resample, _wan_down_forward)
                patched.append(module.resample)
        elif isinstance(module, cls.resample) and module.mode.startswith("upsample"):
            if half:
                usable.reasons.setdefault("upsample_fold", [
                    "fp16/bf16: the folded weight is rounded once more than diffusers' 3x3 one; "
                    "the upsamplers run diffusers' nearest x2 + conv"])  # fmt: skip
            else:
                _set_forward(module.resample, _wan_up_forward)
                patched.append(module.resample)
                ups.append(module.resample)
    akl.tiled_encode = functools.partial(_wan_untiled, akl, "_encode")
    akl.tiled_decode = functools.partial(_wan_untiled, akl, "_decode")
    akl._sdvae_patched = patched
    akl._sdvae_reasons = usable.reasons
    for seq in ups:  # folded now on real weights (on meta ones: at the first call)
        dispatch.refold_upsample(seq, seq[1])
    return akl
