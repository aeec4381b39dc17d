"""The reference VAE against diffusers' AutoencoderKL with the same (random) weights.

diffusers is the independent implementation: the weights are drawn by diffusers' own
initialisation, copied into sdvae with ``from_diffusers``, and every output is compared
with diffusers' (fp32, rel. error < 1e-5) and, for the tiny configs, with diffusers run in
float64.
"""

import pytest
import torch
from conftest import assert_close
from sdvae.kernels.vae_sample import vae_sample_reference

import sdvae
from sdvae import VAE, VAEConfig

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "tiny": VAEConfig.tiny(),
    "tiny-sd3": VAEConfig.tiny(
        latent_channels=3,
        scaling_factor=1.5,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "tiny-3level-noattn": VAEConfig.tiny(
        block_out_channels=(8, 8, 16), layers_per_block=2, mid_block_add_attention=False
    ),
    "sd": VAEConfig(),
}
# (H, W) of the images: square, non-square, odd.
SIZES = {
    "tiny": [(16, 16), (12, 20), (15, 9)],
    "tiny-sd3": [(16, 16), (11, 7)],
    "tiny-3level-noattn": [(16, 16), (13, 18)],
    "sd": [(32, 32), (24, 40), (33, 17)],
}
CASES = [(name, hw) for name in CONFIGS for hw in SIZES[name]]


def _perturb_norms(akl, gen):
    # diffusers initialises GroupNorm to weight 1 / bias 0 and Linear/conv biases uniformly;
    # make the affine parameters non-trivial so a swapped weight/bias would be caught.
    with torch.no_grad():
        for name, p in akl.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


_MODELS = {}


def models(name):
    """(diffusers AutoencoderKL, sdvae VAE) with the same weights, built once per config."""
    if name not in _MODELS:
        torch.manual_seed(1234)
        akl = diffusers.AutoencoderKL(**CONFIGS[name].to_diffusers()).eval()
        _perturb_norms(akl, torch.Generator().manual_seed(99))
        vae = sdvae.from_diffusers(akl)
        assert vae.config == CONFIGS[name]
        _MODELS[name] = (akl, vae)
    return _MODELS[name]


def _images(hw, n=2, dtype=torch.float32):
    return (torch.rand(n, 3, *hw) * 2 - 1).to(dtype)


def _latent_hw(cfg, hw):
    # each stride-2 3x3 conv after the (0, 1) pad: floor((s + 1 - 3) / 2) + 1 = floor(s / 2)
    for _ in range(len(cfg.block_out_channels) - 1):
        hw = tuple(s // 2 for s in hw)
    return hw


@pytest.mark.parametrize("name,hw", CASES)
@torch.no_grad()
def test_encode_mode_matches_diffusers(name, hw):
    akl, vae = models(name)
    cfg = vae.config
    x = _images(hw)
    ours = vae.encode(x, sample=False)
    ref = (akl.encode(x).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
    assert ours.shape == (2, cfg.latent_channels, *_latent_hw(cfg, hw))
    assert_close(ours, ref, torch.float32, name=f"{name} encode mode")


@pytest.mark.parametrize("name,hw", CASES)
@torch.no_grad()
def test_encode_sample_with_noise_matches_diffusers(name, hw):
    akl, vae = models(name)
    cfg = vae.config
    x = _images(hw)
    noise = torch.randn(2, cfg.latent_channels, *_latent_hw(cfg, hw))
    ours = vae.encode(x, noise)
    dist = akl.encode(x).latent_dist
    ref = (dist.mean + dist.std * noise - cfg.shift_factor) * cfg.scaling_factor
    assert_close(ours, ref, torch.float32, name=f"{name} encode sample")


@pytest.mark.parametrize("name,hw", CASES)
@torch.no_grad()
def test_decode_matches_diffusers(name, hw):
    akl, vae = models(name)
    cfg = vae.config
    z = torch.randn(2, cfg.latent_channels, *hw) * 0.5
    z_before = z.clone()
    ours = vae.decode(z)
    assert torch.equal(z, z_before), "decode modified its input"
    ref = akl.decode(z / cfg.scaling_factor + cfg.shift_factor).sample
    f = cfg.downsample_factor
    assert ours.shape == (2, cfg.out_channels, hw[0] * f, hw[1] * f)
    assert_close(ours, ref, torch.float32, name=f"{name} decode")


@pytest.mark.parametrize("name", ["tiny", "tiny-sd3"])
@torch.no_grad()
def test_fp32_close_to_float64_diffusers(name):
    akl, vae = models(name)
    akl64 = diffusers.AutoencoderKL(**vae.config.to_diffusers()).eval()
    akl64.load_state_dict(akl.state_dict())
    akl64 = akl64.double()
    cfg = vae.config
    x = _images((16, 12))
    ref = (akl64.encode(x.double()).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
    assert_close(vae.encode(x, sample=False), ref, torch.float32, name="encode vs float64")
    z = torch.randn(1, cfg.latent_channels, 5, 3)
    ref = akl64.decode(z.double() / cfg.scaling_factor + cfg.shift_factor).sample
    assert_close(vae.decode(z), ref, torch.float32, name="decode vs float64")


@torch.no_grad()
def test_bf16_model_within_end_to_end_tolerance():
    akl, vae = models("tiny")
    vae16 = VAE(vae.config)
    vae16.load_state_dict(vae.state_dict())
    vae16 = vae16.to(torch.bfloat16)
    x = _images((16, 16))
    ref = vae.encode(x, sample=False)
    assert_close(vae16.encode(x.bfloat16(), sample=False), ref, torch.bfloat16, end_to_end=True)
    z = torch.randn(1, 4, 4, 4)
    assert_close(vae16.decode(z.bfloat16()), vae.decode(z), torch.bfloat16, end_to_end=True)


def test_vae_sample_reference_clamps_logvar():
    mean = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    logvar = torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    noise = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    out = vae_sample_reference(
        torch.cat([mean, logvar], 1), noise, scaling_factor=2.0, shift_factor=0.5, sample=True
    )
    std = torch.exp(0.5 * torch.tensor([-30.0, 20.0], dtype=torch.float64)).view(1, 2, 1, 1)
    torch.testing.assert_close(out, (mean + std * noise - 0.5) * 2.0)


class TestSeeds:
    @torch.no_grad()
    def test_seed_reproducible_and_distinct(self):
        _, vae = models("tiny")
        x = _images((16, 16))
        a, b = vae.encode(x, seed=7), vae.encode(x, seed=7)
        c = vae.encode(x, seed=8)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)

    @torch.no_grad()
    def test_default_generator_reproducible(self):
        _, vae = models("tiny")
        x = _images((16, 16))
        torch.manual_seed(3)
        a = vae.encode(x)
        b = vae.encode(x)
        torch.manual_seed(3)
        assert torch.equal(vae.encode(x), a)
        assert not torch.equal(a, b)

    @torch.no_grad()
    def test_sample_false_is_deterministic_mean(self):
        _, vae = models("tiny")
        x = _images((16, 16))
        assert torch.equal(vae.encode(x, sample=False), vae.encode(x, sample=False))


class TestBadInput:
    def test_images_rank(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match="images must be 4-D"):
            vae.encode(torch.rand(3, 16, 16))

    def test_images_channels(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match="images must have 3 channels"):
            vae.encode(torch.rand(1, 4, 16, 16))

    def test_latents_channels(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match="latents must have 4 channels"):
            vae.decode(torch.rand(1, 3, 4, 4))

    def test_dtype_mismatch(self):
        _, vae = models("tiny")
        with pytest.raises(TypeError, match="images has dtype torch.float64"):
            vae.encode(torch.rand(1, 3, 16, 16, dtype=torch.float64))

    def test_not_a_tensor(self):
        _, vae = models("tiny")
        with pytest.raises(TypeError, match="latents must be a torch.Tensor"):
            vae.decode([[1.0]])

    def test_empty(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match="must not be empty"):
            vae.decode(torch.rand(0, 4, 4, 4))

    def test_noise_shape(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match=r"noise must have the latents' shape \(1, 4, 8, 8\)"):
            vae.encode(torch.rand(1, 3, 16, 16), torch.randn(1, 4, 4, 4))

    def test_noise_and_seed(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match="either noise or seed"):
            vae.encode(torch.rand(1, 3, 16, 16), torch.randn(1, 4, 8, 8), seed=1)

    def test_noise_with_sample_false(self):
        _, vae = models("tiny")
        with pytest.raises(ValueError, match="sample=False"):
            vae.encode(torch.rand(1, 3, 16, 16), torch.randn(1, 4, 8, 8), sample=False)

    def test_seed_type(self):
        _, vae = models("tiny")
        with pytest.raises(TypeError, match="seed must be an int"):
            vae.encode(torch.rand(1, 3, 16, 16), seed=1.5)


class TestConfig:
    def test_presets(self):
        assert VAEConfig().scaling_factor == 0.18215
        assert VAEConfig.sdxl().scaling_factor == 0.13025
        assert VAEConfig.sdxl().block_out_channels == (128, 256, 512, 512)
        assert VAEConfig.sd3().latent_channels == 16 and not VAEConfig.sd3().use_quant_conv
        assert VAEConfig().norm_eps == 1e-6
        assert VAEConfig().downsample_factor == 8

    def test_diffusers_round_trip(self):
        for cfg in CONFIGS.values():
            assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            (dict(block_out_channels=(8, 10)), "multiple of norm_num_groups"),
            (dict(latent_channels=0), "latent_channels must be a positive int"),
            (dict(norm_eps=0.0), "norm_eps"),
            (dict(block_out_channels=()), "at least one level"),
            (dict(scaling_factor=0.0), "scaling_factor"),
        ],
    )
    def test_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            VAEConfig.tiny(**kwargs)

    def test_unsupported_diffusers_config(self):
        with pytest.raises(ValueError, match="act_fn"):
            VAEConfig.from_diffusers({"act_fn": "relu"})
        with pytest.raises(ValueError, match="latents_mean"):
            VAEConfig.from_diffusers({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})

    def test_vae_rejects_non_config(self):
        with pytest.raises(TypeError, match="config must be a sdvae.VAEConfig"):
            VAE({"latent_channels": 4})


def test_state_dict_names_are_diffusers_names():
    akl, vae = models("sd")
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in akl.state_dict().items()}
    assert ours == theirs
