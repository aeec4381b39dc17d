"""diffusers' own Wan and Qwen-Image pipelines run unchanged on a VAE ``sdvae.patch_diffusers``
patched: ``WanPipeline`` (decode), ``WanImageToVideoPipeline`` (encode of the conditioning
video, then decode) and ``QwenImagePipeline`` (one-frame decode of unpacked latents), tiny
random components, fp32 on the CPU. The patched pipeline gives the stock pipeline's output
(to fp32 rounding), and sdvae's kernels ran in it.

The text encoders are not built: the pipelines take ``prompt_embeds`` (diffusers' pipeline
modules import ``transformers``, a test dependency for that reason)."""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the pipelines' modules import it (the test extra)

import sdvae  # noqa: E402
from sdvae import dispatch  # noqa: E402


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its init (diffusers' zero-init layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _wan_vae(cls=None, **kw):
    cls = diffusers.AutoencoderKLWan if cls is None else cls
    kw = {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
          "temperal_downsample": [False, True, True], **kw}  # fmt: skip
    vae = cls(**kw).eval()
    _randomize(vae, 1)
    return vae


def _run_both(make_pipe, call) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``call(pipe)`` on the stock pipeline and on the same one with its VAE patched: both
    outputs, and how many times sdvae's RMS norm ran in the patched one."""
    stock = make_pipe()
    patched = make_pipe()
    patched.vae = copy.deepcopy(stock.vae)
    sdvae.patch_diffusers(patched.vae)
    assert patched.vae._sdvae_patched
    ref = call(stock)
    calls = [0]
    orig = dispatch.rms_norm

    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    dispatch.rms_norm = counting
    try:
        got = call(patched)
    finally:
        dispatch.rms_norm = orig
    return ref, got, calls[0]


def _wan_transformer(in_channels: int):
    t = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=16,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    _randomize(t, 2)
    return t


def _embeds(seq: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(seed))


def _wan_pipe(cls, vae, transformer):
    """``make`` for ``_run_both``: a Wan pipeline of ``cls`` without text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return lambda: cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip


def _wan_call(pipe, **kw) -> torch.Tensor:
    """Two steps of a 9-frame 16x16 video, with classifier-free guidance."""
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=_embeds(4, 16, 3), negative_prompt_embeds=_embeds(4, 16, 4),
                height=16, width=16, num_frames=9, num_inference_steps=2, guidance_scale=2.0,
                generator=gen, output_type="pt", **kw).frames  # fmt: skip


def _assert_unchanged(ref, got, norms: int, shape: tuple) -> None:
    """The patched pipeline's output is the stock one's (fp32), and sdvae's norm ran."""
    assert ref.shape == got.shape == shape
    assert norms > 0
    assert (got - ref).abs().max().item() <= 1e-5, (got - ref).abs().max().item()


@torch.no_grad()
def test_wan_text_to_video_pipeline_runs_unchanged_on_the_patched_vae():
    from diffusers import WanPipeline

    make = _wan_pipe(WanPipeline, _wan_vae(), _wan_transformer(16))
    ref, got, norms = _run_both(make, _wan_call)
    _assert_unchanged(ref, got, norms, (1, 9, 3, 16, 16))


@torch.no_grad()
def test_wan_image_to_video_pipeline_encodes_and_decodes_on_the_patched_vae():
    from diffusers import WanImageToVideoPipeline

    # Wan 2.1 I2V's latent input: the noise (16), the first-frame mask (4), the condition (16)
    make = _wan_pipe(WanImageToVideoPipeline, _wan_vae(), _wan_transformer(36))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    encodes = []

    def call(pipe):
        enc = pipe.vae.encode

        def spy(x, *a, **k):
            encodes.append(tuple(x.shape))
            return enc(x, *a, **k)

        pipe.vae.encode = spy
        try:
            return _wan_call(pipe, image=image)
        finally:
            del pipe.vae.encode

    ref, got, norms = _run_both(make, call)
    assert encodes == [(1, 3, 9, 16, 16)] * 2  # the conditioning video, both runs
    _assert_unchanged(ref, got, norms, (1, 9, 3, 16, 16))


@torch.no_grad()
def test_qwen_image_pipeline_runs_unchanged_on_the_patched_vae():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    vae = _wan_vae(AutoencoderKLQwenImage, dim_mult=[1, 2, 4], temperal_downsample=[False, True])
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    _randomize(transformer, 2)

    def make():
        return QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
        )

    def call(pipe):
        return pipe(
            prompt_embeds=_embeds(4, 16, 3),
            prompt_embeds_mask=torch.ones(1, 4, dtype=torch.long),
            height=32,
            width=32,
            num_inference_steps=2,
            true_cfg_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    ref, got, norms = _run_both(make, call)
    _assert_unchanged(ref, got, norms, (1, 3, 32, 32))
