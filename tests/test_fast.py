"""``sdvae.optimize`` and ``sdvae.patch_diffusers``: the fused paths equal the unfused model.

On the CPU the Triton kernels run in the interpreter and ``pad_conv2d`` in its C++ kernel, so
these tests exercise the real fused code on tiny configs; the GPU run adds the real SD config
at 512² in fp16/bf16 and a ``torch.compile(fullgraph=True)`` run.
"""

import copy

import pytest
import torch
from conftest import assert_close

import sdvae
from sdvae import VAE, VAEConfig
from sdvae.fast import op_status
from sdvae.model import AttentionBlock, Conv2d, Downsample, GroupNorm

CFG = VAEConfig.tiny(sample_size=16)
ALL_OPS = ("group_norm", "rms_norm", "attention", "vae_sample", "pad_conv2d", "conv2d")


def _pair(cfg=CFG, device="cpu", dtype=torch.float32):
    torch.manual_seed(11)
    ref = VAE(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = ref.to(device, dtype)
    fast = sdvae.optimize(copy.deepcopy(ref))
    return ref, fast


def test_every_op_is_available_here():
    status = op_status()
    assert set(status) == set(ALL_OPS)
    assert all(not r for r in status.values()), status


def test_optimize_switches_modules_in_place():
    ref, fast = _pair()
    again = sdvae.optimize(fast)
    assert again is fast
    mods = list(fast.modules())
    kinds = (GroupNorm, AttentionBlock, Downsample, Conv2d)
    assert all(m.fused for m in mods if isinstance(m, kinds))
    assert sum(isinstance(m, Conv2d) for m in mods) > 10
    assert fast.fused_sampling and fast.fused_reasons == {}
    sdvae.unoptimize(fast)
    assert not any(m.fused for m in fast.modules() if isinstance(m, kinds))
    assert set(fast.state_dict()) == set(ref.state_dict())


def test_optimize_rejects_other_types():
    with pytest.raises(TypeError, match="vae must be a sdvae.VAE"):
        sdvae.optimize(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("hw", [(16, 16), (15, 9)])
@torch.no_grad()
def test_optimized_encode_decode_equal_unfused(hw):
    ref, fast = _pair()
    x = torch.rand(2, 3, *hw) * 2 - 1
    assert_close(fast.encode(x, sample=False), ref.encode(x, sample=False), name="encode mode")
    lat = ref.encode(x, sample=False)
    noise = torch.randn_like(lat)
    assert_close(fast.encode(x, noise), ref.encode(x, noise), name="encode sample")
    z = torch.randn(2, CFG.latent_channels, *hw) * 0.5
    assert_close(fast.decode(z), ref.decode(z), name="decode")


@torch.no_grad()
def test_optimized_channels_last_input():
    ref, fast = _pair()
    sdvae.optimize(fast, channels_last=True)
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).to(memory_format=torch.channels_last)
    assert_close(fast.encode(x, sample=False), ref.encode(x.contiguous(), sample=False))
    z = torch.randn(1, 4, 4, 4).to(memory_format=torch.channels_last)
    assert_close(fast.decode(z), ref.decode(z.contiguous()))


@torch.no_grad()
def test_channels_last_model_takes_nchw_inputs_without_changing_them():
    """An NCHW input is brought to the model's channels_last once, so every layer runs in it;
    the caller's tensor is left as it was."""
    ref, fast = _pair()
    sdvae.optimize(fast, channels_last=True)
    assert fast.memory_format == torch.channels_last
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    x0 = x.clone()
    lat = fast.encode(x, sample=False)
    assert lat.is_contiguous(memory_format=torch.channels_last)
    assert_close(lat, ref.encode(x, sample=False))
    z = torch.randn(1, 4, 4, 4)
    out = fast.decode(z)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref.decode(z))
    assert torch.equal(x, x0) and x.is_contiguous()
    sdvae.unoptimize(fast)
    assert fast.memory_format is None


@torch.no_grad()
def test_optimized_seeded_sampling_is_reproducible():
    _, fast = _pair()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    a, b, c = fast.encode(x, seed=5), fast.encode(x, seed=5), fast.encode(x, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    mode = fast.encode(x, sample=False)
    assert (a - mode).abs().max() > 0  # noise was added


# ------------------------------------------------------------------------ diffusers patch
diffusers = pytest.importorskip("diffusers")


def _akl_pair():
    ref, _ = _pair()
    akl = sdvae.to_diffusers(ref)
    patched = sdvae.patch_diffusers(sdvae.to_diffusers(ref))
    return akl, patched


@torch.no_grad()
def test_patch_diffusers_equal_outputs():
    akl, patched = _akl_pair()
    assert sdvae.diffusers_patch.is_patched(patched)
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    assert_close(patched.encode(x).latent_dist.mode(), akl.encode(x).latent_dist.mode())
    z = torch.randn(2, 4, 4, 3)
    assert_close(patched.decode(z).sample, akl.decode(z).sample)


@torch.no_grad()
def test_patch_diffusers_sampling_uses_generator():
    _, patched = _akl_pair()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    dist = patched.encode(x).latent_dist
    a = dist.sample(torch.Generator().manual_seed(1))
    b = dist.sample(torch.Generator().manual_seed(1))
    c = dist.sample(torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = (a - dist.mean) / dist.std  # the noise actually drawn
    assert 0.3 < float(z.std()) < 3.0


def _rel(out, ref) -> float:
    return float((out - ref).norm() / ref.norm())


@torch.no_grad()
def test_patch_diffusers_with_slicing_and_tiling():
    akl, patched = _akl_pair()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want_enc = akl.encode(x).latent_dist.mode()
    z = torch.randn(2, 4, 8, 8)
    want_dec = akl.decode(z).sample
    for model in (akl, patched):
        model.enable_slicing()
    assert_close(patched.encode(x).latent_dist.mode(), want_enc, name="sliced encode")
    assert_close(patched.decode(z).sample, want_dec, name="sliced decode")
    for model in (akl, patched):
        model.disable_slicing()
        model.enable_tiling()
    # diffusers' own tiling blends tiles with their own statistics; the patched model's tiling
    # is sdvae's exact path (tests/test_stream.py): it gives the untiled result.
    assert _rel(akl.encode(x).latent_dist.mode(), want_enc) > 1e-3  # 32 > 16: tiled
    assert_close(patched.encode(x).latent_dist.mode(), want_enc, name="tiled encode")
    assert_close(patched.decode(z).sample, want_dec, name="tiled decode")


@torch.no_grad()
def test_unpatch_restores_stock_modules():
    akl, patched = _akl_pair()
    sdvae.unpatch_diffusers(patched)
    assert not sdvae.diffusers_patch.is_patched(patched)
    assert "encode" not in patched.__dict__
    for m in patched.modules():
        assert "forward" not in m.__dict__, type(m).__name__
    assert isinstance(patched.encoder.conv_act, torch.nn.SiLU)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(
        patched.encode(x).latent_dist.mode(), akl.encode(x).latent_dist.mode(), rtol=0, atol=0
    )


def test_patch_rejects_other_types():
    with pytest.raises(TypeError, match="autoencoder_kl must be a diffusers AutoencoderKL"):
        sdvae.patch_diffusers(VAE(CFG))


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_sd_512_on_gpu_within_end_to_end_tolerance(dtype):
    torch.manual_seed(11)
    ref = VAE(VAEConfig()).eval().to("cuda", torch.float64)  # float64: no TF32 in the reference
    fast = sdvae.optimize(copy.deepcopy(ref).to(dtype))
    x = torch.rand(1, 3, 512, 512, device="cuda", dtype=torch.float64) * 2 - 1
    assert_close(
        fast.encode(x.to(dtype), sample=False),
        ref.encode(x, sample=False),
        dtype,
        end_to_end=True,
        name="encode",
    )
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float64)
    assert_close(fast.decode(z.to(dtype)), ref.decode(z), dtype, end_to_end=True, name="decode")


@pytest.mark.cuda
@torch.no_grad()
def test_compile_fullgraph_on_gpu():
    _, fast = _pair(VAEConfig.tiny(), device="cuda", dtype=torch.float16)
    x = torch.rand(1, 3, 64, 64, device="cuda", dtype=torch.float16) * 2 - 1
    enc = torch.compile(lambda t: fast.encode(t, sample=False), fullgraph=True)
    dec = torch.compile(fast.decode, fullgraph=True)
    lat = enc(x)
    assert_close(lat, fast.encode(x, sample=False), torch.float16)
    assert_close(dec(lat), fast.decode(lat), torch.float16)


# ----------------------------------------------------------------------- review regressions
@torch.no_grad()
def test_compile_with_a_seed_that_changes():
    # Dynamo turns a changing int argument into a SymInt; the fused sampling must accept it.
    _, fast = _pair()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    enc = torch.compile(lambda t, s: fast.encode(t, seed=s), fullgraph=True, backend="aot_eager")
    a, b, c = enc(x, 3), enc(x, 4), enc(x, 3)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert torch.equal(a, fast.encode(x, seed=3))


@torch.no_grad()
def test_unsupported_head_dim_stays_eager_with_a_reason():
    cfg = VAEConfig.tiny(block_out_channels=(8,), norm_num_groups=4)  # attention head dim 8
    ref, fast = _pair(cfg)
    attn = [m for m in fast.modules() if isinstance(m, AttentionBlock)]
    assert attn and not any(m.fused for m in attn)
    assert any("head dim" in r for r in fast.fused_reasons["attention"])
    z = torch.randn(1, 4, 6, 5)
    assert_close(fast.decode(z), ref.decode(z))


@torch.no_grad()
def test_fused_model_under_autocast():
    ref, fast = _pair()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    want = ref.encode(x, sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.encode(x, sample=False)
    assert_close(got, want, torch.bfloat16, end_to_end=True)


def test_fused_model_with_grad_mode_on():
    """Parameters require grad and grad mode is on (no torch.no_grad): the fused model must
    not write in place (autograd may need the values) and its gradients are those of the
    unfused model."""
    ref, fast = _pair()
    z = torch.randn(1, 4, 4, 4)
    out = fast.decode(z)
    assert_close(out, ref.decode(z), name="decode, grad mode on")
    zr = z.clone().requires_grad_(True)
    fast.decode(zr).square().mean().backward()
    zr_ref = z.clone().requires_grad_(True)
    ref.decode(zr_ref).square().mean().backward()
    assert_close(zr.grad, zr_ref.grad, name="grad wrt latents")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert_close(fast.encode(x, sample=False), ref.encode(x, sample=False), name="encode")


@torch.no_grad()
def test_attention_block_keeps_the_input_layout():
    ref, fast = _pair()
    block = fast.encoder.mid_block.attentions[0]
    assert block.fused
    x = torch.randn(1, block.to_q.in_features, 3, 5)
    assert block(x).is_contiguous()
    xc = x.contiguous(memory_format=torch.channels_last)
    assert block(xc).is_contiguous(memory_format=torch.channels_last)
