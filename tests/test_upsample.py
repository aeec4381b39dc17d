"""The decoder's upsampler (nearest x2 + 3x3 conv) as one stride-2 transposed conv with a
folded 4x4 weight: the identity in float64, the fused module against the unfused one, the
refold when the weight changes, and the state dict left alone."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import sdvae
from sdvae.model import Upsample, fold_upsample_weight


def _upsample_reference(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (5, 7), (8, 3), (6, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_identity_float64(hw, bias):
    torch.manual_seed(hash(hw) % 1000)
    x = torch.randn(2, 3, *hw, dtype=torch.float64) + 0.5
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if bias else None
    ref = _upsample_reference(x, w, b)
    out = F.conv_transpose2d(x, fold_upsample_weight(w), b, stride=2, padding=1)
    assert out.shape == ref.shape == (2, 5, 2 * hw[0], 2 * hw[1])
    err = (out - ref).abs().max().item()
    assert err < 1e-12 * ref.abs().max().item(), f"max abs error {err}"


def test_fold_rejects_other_kernels():
    with pytest.raises(ValueError, match="weight"):
        fold_upsample_weight(torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match="weight"):
        fold_upsample_weight(torch.randn(4, 4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_fused_module_equals_float64(dtype, layout):
    torch.manual_seed(3)
    m = Upsample(8)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    m = m.to(dtype=dtype, memory_format=fmt)
    x = (torch.randn(2, 8, 5, 6) + 0.3).to(dtype=dtype).contiguous(memory_format=fmt)
    ref = _upsample_reference(x.double(), m.conv.weight.double(), m.conv.bias.double())
    m.fused = True
    out = m(x)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, ref, name=f"upsample {dtype} {layout}")


@torch.no_grad()
def test_refolds_after_weight_changes_and_keeps_state_dict():
    torch.manual_seed(4)
    m = Upsample(4)
    keys = set(m.state_dict())
    m.fused = True
    m.fold()
    assert set(m.state_dict()) == keys == {"conv.weight", "conv.bias"}
    x = torch.randn(1, 4, 3, 3)
    m.conv.weight.mul_(-2.0)  # in place: the fold must notice
    assert_close(m(x), _upsample_reference(x, m.conv.weight, m.conv.bias), name="in place")
    m.load_state_dict({"conv.weight": torch.randn(4, 4, 3, 3), "conv.bias": torch.randn(4)})
    assert_close(m(x), _upsample_reference(x, m.conv.weight, m.conv.bias), name="loaded")
    m.conv.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))  # replaced
    assert_close(m(x), _upsample_reference(x, m.conv.weight, m.conv.bias), name="replaced")


def test_optimize_switches_upsamplers_and_unoptimize_restores():
    vae = sdvae.VAE(sdvae.VAEConfig.tiny(sample_size=16))
    ups = [m for m in vae.modules() if isinstance(m, Upsample)]
    assert ups and not any(m.fused for m in ups)
    sdvae.optimize(vae)
    assert all(m.fused and m.folded_weight is not None for m in ups)
    assert all(m.folded_weight.shape[2:] == (4, 4) for m in ups)
    sdvae.unoptimize(vae)
    assert not any(m.fused for m in ups)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_fused_module_on_gpu_at_vae_shape(dtype):
    torch.manual_seed(5)
    m = Upsample(512).to("cuda", dtype, memory_format=torch.channels_last)
    x = torch.randn(1, 512, 64, 64, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    ref = _upsample_reference(x.double(), m.conv.weight.double(), m.conv.bias.double())
    m.fused = True
    out = m(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, name=f"upsample 512x64^2 {dtype}")


@torch.no_grad()
def test_patch_diffusers_folds_its_upsamplers():
    pytest.importorskip("diffusers")
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(6)
    vae = sdvae.VAE(sdvae.VAEConfig.tiny(sample_size=16)).eval()
    akl = sdvae.to_diffusers(vae)
    keys = set(akl.state_dict())
    ups = [m for m in akl.modules() if isinstance(m, Upsample2D)]
    z = torch.randn(1, 4, 3, 5)
    want = akl.decode(z).sample
    sdvae.patch_diffusers(akl)
    assert ups and all("forward" in m.__dict__ for m in ups)
    assert all(m.folded_weight.shape[2:] == (4, 4) for m in ups)
    assert set(akl.state_dict()) == keys
    assert_close(akl.decode(z).sample, want, name="patched decode")
    # An output_size other than 2x goes to diffusers' own forward.
    x = torch.randn(1, ups[0].channels, 3, 4)
    odd = ups[0](x, output_size=(7, 9))
    assert odd.shape[-2:] == (7, 9)
    assert_close(ups[0](x, output_size=(6, 8)), ups[0].__dict__["_sdvae_original_forward"](x))
    sdvae.unpatch_diffusers(akl)
    assert not any(hasattr(m, "folded_weight") or hasattr(m, "_folded_from") for m in ups)
    assert set(akl.state_dict()) == keys


@pytest.mark.parametrize("channels", [(8, 8, 16), (8, 16)])
@torch.no_grad()
def test_decoder_defers_upsampler_bias_into_the_next_block(monkeypatch, channels):
    """With fused GroupNorms the upsamplers run without their bias, which the next block adds
    in its first GroupNorm's loads and in its residual: through the 1x1 shortcut when the
    channels change (8, 16), into conv2's bias when they do not (8, 8, 16). The decode still
    equals float64."""
    from sdvae.kernels.group_norm import not_supported_reasons

    from sdvae import execute

    if not_supported_reasons(torch.empty(1, 8, 2, 2), 4):
        pytest.skip("GroupNorm is not fused here (CPU without the interpreter)")
    torch.manual_seed(8)
    cfg = sdvae.VAEConfig.tiny(block_out_channels=channels, sample_size=16)
    ref = sdvae.VAE(cfg).eval()
    for p in ref.parameters():
        p.add_(0.1 * torch.randn_like(p))  # non-zero biases everywhere
    fast = sdvae.optimize(sdvae.VAE(cfg).eval())
    fast.load_state_dict(ref.state_dict())
    seen = []
    original = execute.resnet

    def spy(st, state, pending=None, *, owned):
        if pending is not None:
            seen.append(st.shortcut is not None)
        return original(st, state, pending, owned=owned)

    monkeypatch.setattr(execute, "resnet", spy)
    z = torch.randn(2, cfg.latent_channels, 3, 5)
    out = fast.decode(z)
    assert len(seen) == len(channels) - 1
    want_shortcut = [a != b for a, b in zip(channels[::-1], channels[::-1][1:])]
    assert seen == want_shortcut
    assert_close(
        out, ref.double().decode(z.double()), torch.float32, name="decode", end_to_end=True
    )


def test_fold_made_under_inference_mode_can_be_refreshed_outside_it():
    torch.manual_seed(9)
    m = Upsample(4)
    m.fused = True
    with torch.inference_mode():
        m.fold()
        m(torch.randn(1, 4, 3, 3))
    assert not m.folded_weight.is_inference()
    with torch.no_grad():
        m.conv.weight.mul_(0.5)
        x = torch.randn(1, 4, 3, 3)
        assert_close(m(x), _upsample_reference(x, m.conv.weight, m.conv.bias))


@torch.no_grad()
def test_optimize_on_meta_folds_at_the_first_call_on_real_weights():
    """``sdvae.optimize`` on a model built on the meta device (as ``sdvae.load`` builds it)
    registered meta folds, and the ``.to()`` after an ``assign=True`` load failed with
    "Cannot copy out of meta tensor". Now nothing is folded until the weights are real."""
    torch.manual_seed(10)
    cfg = sdvae.VAEConfig.tiny(sample_size=16)
    ref = sdvae.VAE(cfg).eval()
    for p in ref.parameters():
        p.add_(0.05 * torch.randn_like(p))
    with torch.device("meta"):
        fast = sdvae.optimize(sdvae.VAE(cfg).eval())
    ups = [m for m in fast.modules() if isinstance(m, Upsample)]
    assert ups and all(m.fused and m.folded_weight is None for m in ups)
    fast.load_state_dict(ref.state_dict(), assign=True)
    fast = fast.to("cpu")
    z = torch.randn(2, cfg.latent_channels, 3, 5)
    want = ref.double().decode(z.double())
    assert_close(fast.decode(z), want, torch.float32, name="decode", end_to_end=True)
    assert all(m.folded_weight is not None and not m.folded_weight.is_meta for m in ups)
    # A shape-only call on meta weights folds for the call and keeps nothing.
    m = Upsample(4).to("meta")
    m.fused = True
    assert m(torch.empty(1, 4, 3, 5, device="meta")).shape == (1, 4, 6, 10)
    assert m.folded_weight is None


@torch.no_grad()
def test_refold_in_place_keeps_the_buffer_a_cuda_graph_reads():
    """A captured CUDA graph keeps reading ``folded_weight``'s memory: a refold after the weight
    changed in place (or was replaced by one of the same layout) writes into that memory."""
    from sdvae.dispatch import fold_is_current

    torch.manual_seed(11)
    m = Upsample(4)
    m.fused = True
    m.fold()
    buf, ptr = m.folded_weight, m.folded_weight.data_ptr()
    assert fold_is_current(m, m.conv)
    x = torch.randn(1, 4, 3, 3)
    for change in ("in place", "replaced"):
        if change == "in place":
            m.conv.weight.mul_(-0.5)
        else:
            m.conv.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
        assert not fold_is_current(m, m.conv)
        assert_close(m(x), _upsample_reference(x, m.conv.weight, m.conv.bias), name=change)
        assert m.folded_weight is buf and buf.data_ptr() == ptr, change
    m.half().float()  # the module's buffers are replaced: refold from the rounded weight
    assert not fold_is_current(m, m.conv)
    assert_close(m(x), _upsample_reference(x, m.conv.weight, m.conv.bias), name="cast back")


@pytest.mark.parametrize("family", ["sd", "wan"])
def test_training_through_the_fold_reaches_the_3x3_weight(family):
    """Under autograd the folded upsampler's gradient reaches the 3x3 conv weight it is folded
    from, equal to the unfused model's in float64 (before: the kept fold was made without
    autograd, so the upsamplers of an optimized model were silently left untrained)."""
    import copy

    from sdvae import VAE, VAEConfig
    from sdvae.config import WanConfig
    from sdvae.wan import WanVAE

    torch.manual_seed(0)
    if family == "sd":
        ref = VAE(VAEConfig.tiny()).double()
        z = torch.randn(1, 4, 4, 4, dtype=torch.float64)
        conv = lambda m: m.decoder.up_blocks[0].upsamplers[0].conv  # noqa: E731
        run = lambda m: m.decode(z)  # noqa: E731
    else:
        ref = WanVAE(WanConfig.tiny()).double()
        z = torch.randn(1, 4, 2, 2, 3, dtype=torch.float64)
        conv = lambda m: m.decoder.up_blocks[0].upsamplers[0].resample[1]  # noqa: E731
        run = lambda m: m.decode(z, clamp=False)  # noqa: E731
    fused = sdvae.optimize(copy.deepcopy(ref))
    with torch.no_grad():
        run(fused)  # the kept fold made first, as in a model used for inference before
    grads = []
    for m in (ref, fused):
        run(m).square().sum().backward()
        grads.append(conv(m).weight.grad)
    assert grads[1] is not None and grads[0].abs().max() > 0
    assert (grads[1] - grads[0]).abs().max() <= 1e-10 * grads[0].abs().max()
