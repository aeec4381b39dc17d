"""The Wan video VAE family (sdvae.wan) against diffusers 0.42's own classes, same random
weights: AutoencoderKLWan (Wan 2.1, and Wan 2.2's residual/patchified design) and
AutoencoderKLQwenImage, in fp32, for T in {1, 5, 9} frames and odd spatial sizes; the
pipelines' latent normalization; memory that does not grow with the number of frames."""

from __future__ import annotations

import pytest
import torch
from conftest import WAN_TINY, allocator_peak

import sdvae
from sdvae.config import WanConfig
from sdvae.wan import ChunkState, Resample, WanVAE, patchify, unpatchify

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    **WAN_TINY,
    "qwen_image": WanConfig.tiny(diffusers_class="AutoencoderKLQwenImage"),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(name: str):
    """(diffusers model, sdvae model) with the same random, non-trivial weights."""
    cfg = CONFIGS[name]
    cls = getattr(diffusers, cfg.diffusers_class)
    torch.manual_seed(list(CONFIGS).index(name))  # not hash(name): salted per process
    ref = cls(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return request.param, *_pair(request.param)


def _stats(cfg, like):
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(like)
    inv_std = (1.0 / torch.tensor(cfg.latents_std)).view(1, -1, 1, 1, 1).to(like)
    return mean, inv_std


def _raw(cfg, lat):
    """The raw latents ``lat * std + mean`` that pipeline latents ``lat`` stand for."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1, 1)
                 for v in (cfg.latents_mean, cfg.latents_std))  # fmt: skip
    return (lat.double() * std + mean).to(lat.dtype)


@pytest.mark.parametrize("frames", [1, 5, 9])
@torch.no_grad()
def test_encode_and_decode_equal_diffusers(pair, frames):
    """Raw and pipeline latents (the pipelines' ``(z - mean) * (1 / std)`` and
    ``z / (1 / std) + mean``), encode and decode, <= 1e-5 relative in fp32."""
    name, ref, ours = pair
    cfg = ours.config
    h, w = (32, 48) if cfg.is_residual else (33, 45)  # Wan 2.2: sides multiple of 16
    x = torch.rand(1, 3, frames, h, w) * 2 - 1
    want = ref.encode(x).latent_dist.mode()
    got = ours.encode(x, raw=True)
    assert got.shape == want.shape and _rel(got, want) <= 1e-5, (name, _rel(got, want))
    mean, inv_std = _stats(cfg, want)
    want_pipe = (want - mean) * inv_std
    assert _rel(ours.encode(x), want_pipe) <= 1e-5

    t = 1 + (frames - 1) // 4
    lat = torch.randn(2, cfg.z_dim, t, 5, 7)  # odd latent sides, batch 2
    want_img = ref.decode(lat).sample
    got_img = ours.decode(lat, raw=True)
    assert got_img.shape == want_img.shape == (2, 3, 1 + 4 * (t - 1), 5 * cfg.spatial_factor,
                                               7 * cfg.spatial_factor)  # fmt: skip
    assert _rel(got_img, want_img) <= 1e-5, (name, _rel(got_img, want_img))
    pipe = ref.decode(lat / inv_std + mean).sample
    assert _rel(ours.decode(lat), pipe) <= 1e-5


@torch.no_grad()
def test_images_are_one_frame_videos(pair):
    name, ref, ours = pair
    img = torch.rand(2, 3, 32, 48) * 2 - 1
    lat = ours.encode(img)
    assert lat.dim() == 4 and torch.equal(lat, ours.encode(img.unsqueeze(2))[:, :, 0])
    out = ours.decode(lat)
    assert out.shape == img.shape
    assert torch.equal(out, ours.decode(lat.unsqueeze(2))[:, :, 0])
    want = ref.decode(ref.encode(img.unsqueeze(2)).latent_dist.mode()).sample[:, :, 0]
    assert _rel(ours.decode(ours.encode(img, raw=True), raw=True), want) <= 1e-5


@torch.no_grad()
def test_decode_does_not_clamp_when_asked_and_never_modifies_latents(pair):
    _, ref, ours = pair
    lat = torch.randn(1, ours.config.z_dim, 2, 3, 4) * 3
    keep = lat.clone()
    raw = ours.decode(lat, clamp=False)
    assert torch.equal(lat, keep)
    assert torch.equal(ours.decode(lat), raw.clamp(-1, 1))


def test_patchify_matches_diffusers():
    from diffusers.models.autoencoders import autoencoder_kl_wan as dw

    x = torch.randn(2, 3, 5, 8, 12)
    assert torch.equal(patchify(x, 2), dw.patchify(x, 2))
    assert torch.equal(unpatchify(patchify(x, 2), 2), x)
    y = torch.randn(1, 12, 3, 4, 6)
    assert torch.equal(unpatchify(y, 2), dw.unpatchify(y, 2))


@torch.no_grad()
def test_sampling_uses_the_posterior():
    _, ours = _pair("wan21")
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean = ours.encode(x, raw=True)
    noise = torch.randn_like(mean)
    mom = ours.moments(x)
    std = torch.exp(0.5 * mom.chunk(2, 1)[1].clamp(-30, 20))
    assert torch.allclose(ours.encode(x, raw=True, sample=True, noise=noise), mean + std * noise)
    a = ours.encode(x, sample=True, seed=3)
    assert torch.equal(a, ours.encode(x, sample=True, seed=3))
    assert not torch.equal(a, ours.encode(x, sample=True, seed=4))


def test_bad_input_is_refused_with_the_argument_named():
    _, ours = _pair("wan21")
    with pytest.raises(ValueError, match="video has 4 frames"):
        ours.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"video must be \(N, 3, T, H, W\)"):
        ours.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(TypeError, match="video must be a floating tensor"):
        ours.encode(torch.zeros(1, 3, 5, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"latents must be \(N, 4, T, H, W\)"):
        ours.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="noise was given but sample=False"):
        ours.encode(torch.zeros(1, 3, 1, 16, 16), noise=torch.zeros(1, 4, 1, 2, 2))
    _, wan22 = _pair("wan22")
    with pytest.raises(ValueError, match="multiples of 16"):
        wan22.encode(torch.zeros(1, 3, 1, 24, 32))


def test_a_config_without_latent_statistics_gives_raw_latents_only():
    cfg = CONFIGS["wan21"].replace(latents_mean=None, latents_std=None)
    m = WanVAE(cfg).eval()
    with torch.no_grad():
        assert m.encode(torch.zeros(1, 3, 1, 16, 16), raw=True).shape == (1, 4, 1, 2, 2)
        with pytest.raises(ValueError, match="raw=True"):
            m.encode(torch.zeros(1, 3, 1, 16, 16))
        with pytest.raises(ValueError, match="raw=True"):
            m.decode(torch.zeros(1, 4, 1, 2, 2))


def test_config_round_trips_through_diffusers():
    for cfg in (*CONFIGS.values(), WanConfig.wan21(), WanConfig.qwen_image(),
                WanConfig.wan22(latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48)):  # fmt: skip
        cls = getattr(diffusers, cfg.diffusers_class)
        with torch.device("meta"):  # diffusers' own config, defaults filled in
            d = dict(cls(**cfg.to_diffusers()).config, _class_name=cfg.diffusers_class)
        assert WanConfig.from_diffusers(d) == cfg, cfg
    with pytest.raises(ValueError, match="attn_scales"):
        WanConfig.from_diffusers({"attn_scales": [0.5]})
    with pytest.raises(ValueError, match="Qwen-Image 2's VAE is not one of the supported"):
        WanConfig.from_diffusers({"_class_name": "AutoencoderKLQwenImage21"})
    if hasattr(diffusers, "AutoencoderKLQwenImage21"):  # refused with the same reason
        with torch.device("meta"):  # its defaults, built without memory
            q21 = diffusers.AutoencoderKLQwenImage21()
        for fn in (sdvae.patch_diffusers, sdvae.from_diffusers):
            with pytest.raises(TypeError, match="2-D specialization of Wan 2.2"):
                fn(q21)
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanConfig(dim_mult=(1, 2), temperal_downsample=(True, True))


@torch.no_grad()
def test_decode_memory_does_not_grow_with_frames():
    """The allocator-level peak of a decode beyond its output (the frames it returns) at 9
    latent frames is within 5% of the peak at 3: one latent frame at a time, the frames each
    causal conv keeps, and the output written in place."""
    _, ours = _pair("wan21")
    peaks = {}
    for t in (3, 9):
        lat = torch.randn(1, 4, t, 8, 8)
        ours.decode(lat)  # warm-up
        out, peak = allocator_peak(lambda lat=lat: ours.decode(lat))
        peaks[t] = peak - out.nbytes
    assert peaks[9] <= 1.05 * peaks[3], peaks


# ------------------------------------------------------------------------------- loading
@torch.no_grad()
def test_load_from_diffusers_folder_safetensors_and_round_trip(tmp_path, pair):
    """A diffusers folder (config.json gives the config), a bare safetensors file (the
    architecture read off the shapes), from_diffusers / to_diffusers: the same weights and
    the same decode."""
    from safetensors.torch import save_file

    name, ref, ours = pair
    ref.save_pretrained(tmp_path / "vae")
    a = sdvae.load(tmp_path / "vae")
    assert isinstance(a, sdvae.WanVAE) and a.config == ours.config
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    b = sdvae.load(tmp_path / "w.safetensors", config=ours.config)
    inferred = sdvae.load(tmp_path / "w.safetensors")
    stats = dict(latents_mean=None, latents_std=None, scale_factor_spatial=8,
                 diffusers_class="AutoencoderKLWan")  # fmt: skip
    arch = ours.config.replace(**stats)
    assert inferred.config.replace(scale_factor_spatial=8) == arch, inferred.config
    c = sdvae.from_diffusers(ref)
    assert c.config == ours.config
    back = sdvae.to_diffusers(c)
    assert type(back) is type(ref)
    lat = torch.randn(1, ours.config.z_dim, 2, 3, 4)
    want = ref.decode(lat).sample
    for m in (a, b, inferred, c):
        assert torch.equal(m.decode(lat, raw=True), want)
    assert torch.equal(back.decode(lat).sample, want)


def test_original_wan_keys_load_as_diffusers_converter_loads_them():
    """An original Wan2.1_VAE.pth-style state dict: sdvae.load equals diffusers' own
    single-file converter followed by a strict load (the layout that converter handles)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from test_wan_keys import _tensors, wan21_original_shapes

    torch.manual_seed(5)
    orig = _tensors(wan21_original_shapes(4, 16, [1, 2, 4, 4], 2, [False, True, True]))
    ref = diffusers.AutoencoderKLWan(base_dim=4, z_dim=16).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(orig)), strict=True)
    ours = sdvae.load({f"vae.{k}": v for k, v in orig.items()})
    assert ours.config == WanConfig.wan21(base_dim=4)  # 16 channels: Wan 2.1's statistics
    want = ref.state_dict()
    got = ours.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_a_checkpoint_that_does_not_match_is_refused_with_the_keys_listed():
    from sdvae.loading import CheckpointError

    ref, _ = _pair("wan21")
    sd = dict(ref.state_dict())
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    want = r"(?s)missing keys.*decoder\.conv_out\.bias.*unexpected keys.*decoder\.extra\.weight"
    with pytest.raises(CheckpointError, match=want):
        sdvae.load(sd, config=CONFIGS["wan21"])


# --------------------------------------------------------------------------- fused path
def _fused_pair(name: str, dtype: torch.dtype, channels_last: bool = True):
    import copy

    _, ours = _pair(name)
    ref = copy.deepcopy(ours).to(dtype)
    fused = sdvae.optimize(copy.deepcopy(ours).to(dtype), channels_last=channels_last)
    return ref, fused


@pytest.mark.parametrize("name,channels_last", [("wan21", True), ("wan22", False)])
@torch.no_grad()
def test_fused_equals_unfused_in_float64(name, channels_last):
    """The fused path (the RMS norm kernel in Triton's interpreter, written straight into the
    causal convs' frame buffers; the folded upsampler) against the eager modules, in float64:
    <= 1e-10. The attention kernel and pad_conv2d take no float64: they stay eager, with the
    reasons listed."""
    ref, fused = _fused_pair(name, torch.float64, channels_last)
    on = {type(m).__name__ for m in fused.modules() if getattr(m, "fused", False)}
    assert {"RMSNorm", "CausalConv3d", "Resample"} <= on, on
    assert set(fused.fused_reasons) == {"attention", "pad_conv2d"}, fused.fused_reasons
    cfg = ref.config
    x = torch.rand(1, 3, 5, 16, 16, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, cfg.z_dim, 2, 2, 3, dtype=torch.float64)
    assert _rel(fused.encode(x), ref.encode(x)) <= 1e-10
    assert _rel(fused.decode(z, clamp=False), ref.decode(z, clamp=False)) <= 1e-10


@torch.no_grad()
def test_first_conv_bias_goes_into_the_second_norm_where_the_conv_adds_it_apart(monkeypatch):
    """Where ATen's conv3d adds its bias in a pass of its own (CUDA; forced here), each
    residual block's first conv runs without it and the second norm adds it in its loads
    (``input_bias``): once per block call, the result equal to the unfused model's in float64
    (the kernel in the interpreter). On the CPU (oneDNN adds the bias inside the conv) nothing
    is moved."""
    from sdvae import dispatch
    from sdvae import wan as W

    ref, fused = _fused_pair("wan21", torch.float64)
    seen = {"blocks": 0, "input_bias": 0}
    real = dispatch.rms_norm

    def spy(*a, input_bias=None, **k):
        seen["input_bias"] += input_bias is not None
        return real(*a, input_bias=input_bias, **k)

    for m in fused.modules():
        if isinstance(m, W.ResidualBlock):
            m.register_forward_hook(lambda *_: seen.__setitem__("blocks", seen["blocks"] + 1))
    monkeypatch.setattr(dispatch, "rms_norm", spy)
    x = torch.rand(1, 3, 5, 16, 16, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, ref.config.z_dim, 2, 2, 3, dtype=torch.float64)
    fused.decode(z, clamp=False)
    assert seen["blocks"] > 0 and seen["input_bias"] == 0, seen  # the CPU: not moved
    monkeypatch.setattr(W, "_bias_apart", lambda t: True)
    seen.update(blocks=0, input_bias=0)
    assert _rel(fused.encode(x), ref.encode(x)) <= 1e-10
    assert _rel(fused.decode(z, clamp=False), ref.decode(z, clamp=False)) <= 1e-10
    assert seen["blocks"] > 0 and seen["input_bias"] == seen["blocks"], seen


@torch.no_grad()
def test_time_upsample_writes_its_frames_in_place():
    """Fused, channels_last_3d: the temporal upsampler's time_conv and frame interleave are one
    GEMM per output frame, written in place (the conv itself never runs): the same frames and
    kept frames as the eager conv + interleave, float64, batch 2, 2 frames."""
    torch.manual_seed(0)
    cl3 = torch.channels_last_3d
    eager, fused = Resample(6, "upsample3d").double(), Resample(6, "upsample3d").double()
    fused.load_state_dict(eager.state_dict())
    fused.time_conv.fused = True

    def boom(*a, **k):
        raise AssertionError("the time_conv ran as a conv")

    fused.time_conv.forward = boom
    x = torch.randn(2, 6, 2, 4, 5, dtype=torch.float64).contiguous(memory_format=cl3)
    kept = torch.randn(2, 6, 2, 4, 5, dtype=torch.float64)
    states = []
    for m in (eager, fused):
        st = ChunkState()
        st.first, st.frames[m.time_conv] = False, kept.clone()
        states.append((m(x, st), st.frames[m.time_conv]))
    (ref, ref_kept), (got, got_kept) = states
    assert got.shape == ref.shape == (2, 3, 4, 8, 10)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert torch.equal(got_kept, ref_kept)


@pytest.mark.parametrize("name", ["wan21"])
@torch.no_grad()
def test_fused_half_precision_error_is_no_larger_than_diffusers(name):
    """fp16 and bf16, every kernel on (attention and pad_conv2d included), against a float64
    run of the same weights: the fused path's error, averaged over three inputs, is no larger
    than diffusers' own in the same dtype (its RMS norm rounds once, diffusers' twice). In
    half precision the upsamplers are not folded: the folded weight's extra rounding made the
    decode's error larger than diffusers' (+7% in fp16 on this model). One input alone is not
    enough at these sizes: the rounding of a few hundred values decides it either way."""
    import copy

    ref, _ = _pair(name)
    z_dim = CONFIGS[name].z_dim
    m64 = sdvae.from_diffusers(copy.deepcopy(ref).double())
    inputs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
        z = torch.randn(1, z_dim, 2, 2, 2, generator=g)
        inputs.append((x, z, m64.encode(x.double(), raw=True), m64.decode(z.double(), raw=True)))
    for dtype in (torch.float16, torch.bfloat16):
        d = copy.deepcopy(ref).to(dtype)
        f = sdvae.optimize(sdvae.from_diffusers(copy.deepcopy(ref).to(dtype)), channels_last=True)
        assert set(f.fused_reasons) == {"upsample_fold"}, f.fused_reasons  # see optimize_wan
        theirs = torch.zeros(2, dtype=torch.float64)
        ours = torch.zeros(2, dtype=torch.float64)
        for x, z, want_e, want_d in inputs:
            x, z = x.to(dtype), z.to(dtype)
            theirs += torch.tensor([_rel(d.encode(x).latent_dist.mode(), want_e),
                                    _rel(d.decode(z).sample, want_d)])  # fmt: skip
            ours += torch.tensor([_rel(f.encode(x, raw=True), want_e),
                                  _rel(f.decode(z, raw=True), want_d)])  # fmt: skip
        assert (ours <= theirs).all(), (dtype, (ours / 3).tolist(), (theirs / 3).tolist())


def _spy_norm_outs(monkeypatch) -> list:
    """The ``out=`` of every ``dispatch.rms_norm`` call from now on (None: not in place)."""
    from sdvae import dispatch

    seen = []
    real = dispatch.rms_norm

    def spy(x, weight, **kw):
        seen.append(kw.get("out"))
        return real(x, weight, **kw)

    monkeypatch.setattr(dispatch, "rms_norm", spy)
    return seen


def test_fused_causal_conv_norms_straight_into_its_frame_buffer(monkeypatch):
    """In channels_last_3d at batch 1 the norm writes the new frames into the conv's input
    buffer (``out=`` a view of it: no concatenation, no copy); the result equals the eager
    conv of the norm, with the kept frames carried over."""
    from sdvae.wan import CausalConv3d, ChunkState, RMSNorm

    torch.manual_seed(0)
    conv, norm = CausalConv3d(6, 5, 3, padding=1), RMSNorm(6, silu=True)
    with torch.no_grad():
        norm.gamma.add_(torch.randn_like(norm.gamma))
    seen = _spy_norm_outs(monkeypatch)
    chunks = [torch.randn(1, 6, t, 4, 5).contiguous(memory_format=torch.channels_last_3d)
              for t in (1, 4, 4)]  # fmt: skip
    eager_state, fused_state = ChunkState(), ChunkState()
    with torch.no_grad():
        for x in chunks:
            conv.fused = norm.fused = False
            want = conv(x, eager_state, norm=norm)
            conv.fused = norm.fused = True
            got = conv(x, fused_state, norm=norm)
            assert _rel(got, want) <= 1e-6
    outs = seen[1::2]  # the fused calls
    assert all(o is not None and o.shape[2] == x.shape[2] for o, x in zip(outs, chunks))


def test_fused_path_keeps_channels_last_3d_and_norms_a_frames_view_in_place(monkeypatch):
    """A fused causal conv returns channels_last_3d on every device (cuDNN does on CUDA;
    ATen's CPU kernel is copied), so the CPU runs the GPU's layout-dependent paths; and a
    one-frame input that is the 5-D view of a per-frame 2-D conv's channels_last output (its
    frame and batch strides arbitrary, as a ``Resample`` returns it) is still normed straight
    into the frame buffer, not copied there."""
    from sdvae import dispatch
    from sdvae.wan import CausalConv3d, ChunkState, RMSNorm

    torch.manual_seed(0)
    conv, norm = CausalConv3d(6, 5, 3, padding=1), RMSNorm(6, silu=True)
    conv.fused = norm.fused = True
    conv.to(memory_format=torch.channels_last_3d)
    seen = _spy_norm_outs(monkeypatch)
    # a frame, channels last, with the strides of its size-1 dims as a trace showed them
    x = torch.randn(4 * 5 * 6).as_strided((1, 6, 1, 4, 5), (6, 1, 6, 30, 6))
    with torch.no_grad():
        got = conv(x, ChunkState(), norm=norm)
        conv.fused = norm.fused = False
        want = conv(x.contiguous(), ChunkState(), norm=norm)
    assert seen[0] is not None  # the norm wrote into the buffer
    assert got.is_contiguous(memory_format=torch.channels_last_3d) and not got.is_contiguous()
    assert _rel(got, want) <= 1e-6
    x3 = torch.randn(1, 6, 3, 4, 5)
    y = dispatch.conv3d(x3, conv.weight, conv.bias, 1, (0, 1, 1))
    assert y.is_contiguous()  # NCDHW in, NCDHW out


def test_conv3d_on_meta_for_a_gpu_holds_what_the_gpu_holds():
    """The planner's shape-only run for a GPU gets channels_last_3d straight from
    ``dispatch.conv3d`` (no copy counted); for the CPU, the copy the CPU makes is counted."""
    from sdvae import dispatch
    from sdvae.memtrack import TensorMemory

    cl3 = torch.channels_last_3d
    x = torch.empty(1, 8, 3, 16, 16, device="meta").contiguous(memory_format=cl3)
    w = torch.empty(8, 8, 1, 1, 1, device="meta").contiguous(memory_format=cl3)
    peaks = {}
    for dev in ("cuda", "cpu"):
        with TensorMemory("meta", collect=False) as tracker, dispatch.metered(tracker, dev):
            y = dispatch.conv3d(x, w, None)
            assert y.is_contiguous(memory_format=cl3) and not y.is_contiguous()
            del y
        peaks[dev] = tracker.peak
    out = 8 * 3 * 16 * 16 * 4
    assert peaks["cuda"] == out
    assert peaks["cpu"] >= 2 * out


def test_fused_model_under_autograd_gives_the_unfused_gradients():
    """With autograd recording, the fused path takes no ``out=`` writes (the norm into the
    frame buffer, the in-place temporal upsampler): decode and encode backpropagate, to the
    unfused model's gradients in float64 (before: ``out=`` errors)."""
    import copy

    _, ref = _pair("wan21")
    ref = ref.double()
    fused = sdvae.optimize(copy.deepcopy(ref), channels_last=True)
    for mod in fused.modules():
        if type(mod).__name__ == "RMSNorm":
            mod.fused = True
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, ref.config.z_dim, 3, 4, 4, generator=g, dtype=torch.float64)
    video = torch.rand(1, 3, 5, 32, 16, generator=g, dtype=torch.float64) * 2 - 1
    for op, x in (("decode", lat), ("encode", video)):
        grads = []
        for m in (ref, fused):
            m.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = m.decode(xi, clamp=False) if op == "decode" else m.encode(xi)
            y.square().sum().backward()
            grads.append((xi.grad, m.decoder.conv_in.weight.grad if op == "decode"
                          else m.encoder.conv_in.weight.grad))  # fmt: skip
        for got, want in zip(grads[1], grads[0]):
            assert _rel(got, want) <= 1e-10, (op, _rel(got, want))


def test_pipeline_latents_train_post_quant_conv_as_raw_latents_do():
    """The de-normalization folded into ``post_quant_conv`` keeps autograd: the weight's
    gradient from pipeline latents equals the one from the raw latents they stand for (before:
    the fold detached the weight, so pipeline latents left it untrained)."""
    _, vae = _pair("wan21")
    vae = vae.double()
    cfg = vae.config
    lat = torch.randn(1, cfg.z_dim, 2, 3, 4, dtype=torch.float64)
    grads = []
    for z, raw in ((lat, False), (_raw(cfg, lat), True)):
        vae.zero_grad()
        vae.decode(z, raw=raw, clamp=False).square().sum().backward()
        grads.append(vae.post_quant_conv.weight.grad.clone())
    assert grads[0].abs().max() > 0
    assert _rel(grads[0], grads[1]) <= 1e-10


@torch.no_grad()
def test_latent_statistics_and_the_fold_are_made_once_and_follow_weight_changes(monkeypatch):
    """After the first call, decode and encode copy nothing from the host for the latent
    statistics or the folded ``post_quant_conv`` (no sync before the decode's launches); an
    in-place change of ``post_quant_conv``'s weight is picked up."""
    _, vae = _pair("wan21")
    z = torch.randn(1, vae.config.z_dim, 2, 3, 4)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    vae.decode(z)
    vae.encode(x)

    def host_copy(*a, **k):
        raise AssertionError("torch.tensor (a host-to-device copy) on a later call")

    with monkeypatch.context() as m:
        m.setattr(torch, "tensor", host_copy)
        first = vae.decode(z, clamp=False)
        vae.encode(x)
        vae.post_quant_conv.weight.mul_(1.5)
        changed = vae.decode(z, clamp=False)
    want = vae.decode(_raw(vae.config, z), raw=True, clamp=False)
    assert not torch.equal(first, changed)
    assert _rel(changed, want) <= 1e-5  # fp32; the weight change moved it by ~0.5


def test_latent_statistics_are_not_kept_from_a_traced_call(monkeypatch):
    """Under torch.compile (or a CUDA-graph capture) the statistics are made for the call and
    not kept: they would be the traced graph's outputs, which a later replay may overwrite."""
    _, vae = _pair("wan21")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    vae._stats(torch.float32, torch.device("cpu"))
    assert not vae.__dict__.get("_stats_cache")
    monkeypatch.undo()
    vae._stats(torch.float32, torch.device("cpu"))
    assert len(vae.__dict__["_stats_cache"]) == 1


def test_unoptimize_switches_every_fused_op_off():
    _, fused = _fused_pair("wan21", torch.float32)
    sdvae.unoptimize(fused)
    assert not any(getattr(m, "fused", False) for m in fused.modules())
    assert fused.memory_format is None and fused.fused_reasons == {}


# ------------------------------------------------------------------------ patch_diffusers
@pytest.mark.parametrize("name", ["wan21", "qwen_image"])  # Wan 2.2: the same leaf classes
@torch.no_grad()
def test_patch_diffusers_equals_stock_and_tiling_runs_the_exact_path(name):
    """``sdvae.patch_diffusers`` on AutoencoderKLWan / AutoencoderKLQwenImage: diffusers' own
    chunked forwards with the RMS norm (+ the SiLU after it), attention, downsamplers and
    (fp32) folded upsamplers on sdvae's ops; fp32 <= 1e-5 against the stock model.
    ``enable_tiling()`` gives the untiled result (stock diffusers' blended tiles do not);
    ``unpatch_diffusers`` restores the stock forwards."""
    import copy

    ref, _ = _pair(name)
    stock = copy.deepcopy(ref)
    akl = sdvae.patch_diffusers(ref)
    assert akl is ref and akl._sdvae_reasons == {}, akl._sdvae_reasons
    kinds = {type(m).__name__ for m in akl._sdvae_patched}
    assert {"Sequential"} <= kinds and any("RMS_norm" in k for k in kinds), kinds
    assert any("Attention" in k for k in kinds), kinds
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = torch.randn(1, CONFIGS[name].z_dim, 2, 2, 3)
    want_e = stock.encode(x).latent_dist.mode()
    want_d = stock.decode(z).sample
    assert _rel(akl.encode(x).latent_dist.mode(), want_e) <= 1e-5
    got = akl.decode(z).sample
    assert _rel(got, want_d) <= 1e-5
    tiles = dict(tile_sample_min_height=16, tile_sample_min_width=16,
                 tile_sample_stride_height=8, tile_sample_stride_width=8)  # fmt: skip
    for m in (akl, stock):
        m.enable_tiling(**tiles)
    assert torch.equal(akl.decode(z).sample, got)
    assert not torch.equal(stock.decode(z).sample, want_d)  # tiling did engage
    akl.disable_tiling()
    sdvae.unpatch_diffusers(akl)
    from sdvae.diffusers_patch import is_patched

    left = [(n, k) for n, m in akl.named_modules() for k in vars(m) if "_sdvae" in k]
    assert not is_patched(akl) and left == [("", "_sdvae_reasons")], left
    assert torch.equal(akl.decode(z).sample, want_d)


def test_patch_diffusers_refuses_a_budget_and_channels_last_for_wan_leaving_it_stock():
    from sdvae.diffusers_patch import is_patched

    ref, _ = _pair("wan21")
    with pytest.raises(ValueError, match="max_memory / offload: not available"):
        sdvae.patch_diffusers(ref, max_memory="1GiB")
    with pytest.raises(ValueError, match="channels_last=True: not available"):
        sdvae.patch_diffusers(ref, channels_last=True)
    assert not is_patched(ref)
    assert not any("_sdvae" in k for m in ref.modules() for k in vars(m))
