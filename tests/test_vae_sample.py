"""``vae_sample``: the fused sampling step against its float64 reference, the in-kernel noise
(determinism, reproducibility, distribution), per-channel scale and shift (FLUX.2's latent
normalization), the torch.library op, bad input, the AOT compile of every kernel variant the
launcher can pick, and the benchmark suite."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import aot_compile, assert_close
from sdvae.kernels.vae_sample import (
    BLOCK_G_CHOICES,
    block_shape,
    not_supported_reasons,
    vae_sample,
    vae_sample_reference,
)

from sdvae.bench import engine

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# (N, 2C, H, W): 1x1 spatial with C = 1, non-power-of-two H*W and C = 3, the SD latent
# (C = 4), SD3/Flux's C = 16, and rows longer than one 1024-element tile (C*H*W = 6400).
SHAPES = [(1, 2, 1, 1), (2, 6, 5, 7), (2, 8, 3, 9), (1, 32, 4, 4), (1, 8, 40, 40)]
FACTORS = [(0.18215, 0.0), (0.13025, 0.0), (1.5305, 0.0609), (1.0, -2.5)]


def _fmt(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _moments(shape, dtype, device, layout="nchw"):
    """Random moments: mean ~ N(0.3, 1.5^2), log-variance ~ N(-1, 2^2)."""
    n, c2, h, w = shape
    mean = torch.randn(n, c2 // 2, h, w) * 1.5 + 0.3
    logvar = torch.randn(n, c2 // 2, h, w) * 2.0 - 1.0
    m = torch.cat([mean, logvar], dim=1).to(device, dtype)
    return m.contiguous(memory_format=_fmt(layout))


def _latent_shape(shape):
    n, c2, h, w = shape
    return (n, c2 // 2, h, w)


def _ref(moments, noise, scale=0.18215, shift=0.0, sample=True):
    return vae_sample_reference(
        moments.double(),
        None if noise is None else noise.double(),
        scaling_factor=scale,
        shift_factor=shift,
        sample=sample,
    )


def _kernel_runs(device) -> bool:
    """The Triton kernel (not the eager reference) runs for float tensors on ``device``."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_format(out, moments, layout):
    assert out.dtype == moments.dtype
    assert out.device == moments.device
    assert out.is_contiguous(memory_format=_fmt(layout)), out.stride()


def _noise_of(seed, shape, device):
    """The kernel's own noise for ``seed``: zero mean, zero log-variance, scale 1, shift 0."""
    zeros = torch.zeros(shape[0], 2 * shape[1], *shape[2:], device=device)
    return vae_sample(zeros, seed=seed, scaling_factor=1.0, shift_factor=0.0)


# ------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_with_given_noise(device, shape, dtype, layout):
    m = _moments(shape, dtype, device, layout)
    noise = torch.randn(_latent_shape(shape)).to(device, dtype)
    out = vae_sample(m, noise)
    _check_format(out, m, layout)
    assert_close(out, _ref(m, noise), dtype, name=f"vae_sample{shape}")


@pytest.mark.parametrize("factors", FACTORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_and_shift(device, dtype, factors):
    scale, shift = factors
    m = _moments((2, 8, 6, 5), dtype, device)
    noise = torch.randn(2, 4, 6, 5).to(device, dtype)
    out = vae_sample(m, noise, scaling_factor=scale, shift_factor=shift)
    assert_close(out, _ref(m, noise, scale, shift), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_upper_at_plus_100(device, dtype, layout):
    # Unclamped, std = e^50; clamped, e^10. Noise bounded by 2.5 so that even the eager fp16
    # chain (the CPU path without the interpreter) stays below fp16's 65504.
    m = _moments((2, 8, 5, 6), torch.float32, device, layout)
    m[:, 4:, :, ::2] = 100.0
    m[:, 4:, :, 1::2] = 25.0
    m = m.to(dtype).contiguous(memory_format=_fmt(layout))
    noise = torch.randn(2, 4, 5, 6).clamp(-2.5, 2.5).to(device, dtype)
    out = vae_sample(m, noise)
    _check_format(out, m, layout)
    assert_close(out, _ref(m, noise), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamp_lower_at_minus_100(device, dtype, layout):
    # Zero mean, so the latent is std*noise*scale: e^-15 clamped, e^-50 unclamped (fp16 cannot
    # hold e^-15 * 0.18 normally, hence fp32 and bf16 only).
    m = torch.zeros(2, 8, 5, 6)
    m[:, 4:] = -100.0
    m[:, 4:, 0] = -31.0
    m = m.to(device, dtype).contiguous(memory_format=_fmt(layout))
    noise = torch.randn(2, 4, 5, 6).to(device, dtype)
    out = vae_sample(m, noise)
    assert_close(out, _ref(m, noise), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_false_is_scaled_mean(device, dtype, layout):
    m = _moments((2, 6, 7, 3), dtype, device, layout)
    out = vae_sample(m, sample=False, scaling_factor=0.13025, shift_factor=0.25)
    _check_format(out, m, layout)
    assert_close(out, _ref(m, None, 0.13025, 0.25, sample=False), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_kernel_noise_path_matches_reference(device, dtype, layout):
    # The kernel's noise for a seed does not depend on dtype or values: read it back with zero
    # moments, then check the random-moments result against the reference with that noise.
    if not _kernel_runs(device):
        pytest.skip("CPU without the interpreter runs the reference with torch.randn noise")
    shape = (2, 8, 9, 5)
    noise = _noise_of(1234, _latent_shape(shape), device)
    m = _moments(shape, dtype, device, layout)
    out = vae_sample(m, seed=1234, scaling_factor=0.13025, shift_factor=0.1)
    _check_format(out, m, layout)
    assert_close(out, _ref(m, noise, 0.13025, 0.1), dtype)


def test_non_contiguous_input_is_made_contiguous(device):
    base = _moments((2, 8, 6, 10), torch.float32, device)
    m = base[:, :, :, ::2]  # neither NCHW- nor channels_last-contiguous
    noise = torch.randn(2, 4, 6, 5).to(device)
    out = vae_sample(m, noise)
    assert out.is_contiguous()
    assert_close(out, _ref(m, noise))


def test_noise_in_other_layout_than_moments(device):
    m = _moments((2, 8, 4, 6), torch.float32, device, "channels_last")
    noise = torch.randn(2, 4, 4, 6).to(device)  # NCHW
    out = vae_sample(m, noise)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, _ref(m, noise))


def test_empty_batch(device):
    out = vae_sample(torch.randn(0, 8, 4, 4, device=device), seed=1)
    assert out.shape == (0, 4, 4, 4)


# ------------------------------------------------------------ per-channel scale and shift
def _channel_factors(c, device, dtype=torch.float32):
    """Per-channel factors like FLUX.2's: shift = a running mean, scale = 1/sqrt(var + eps)."""
    shift = (torch.randn(c) * 0.7 + 0.2).to(device, dtype)
    scale = (1.0 / torch.sqrt(torch.rand(c) * 3.0 + 0.05)).to(device, dtype)
    return scale, shift


PER_CHANNEL_SHAPES = [(1, 2, 1, 1), (2, 8, 5, 7), (1, 16, 3, 4), (2, 6, 20, 20)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PER_CHANNEL_SHAPES)
def test_per_channel_factors_match_reference(device, shape, dtype, layout):
    m = _moments(shape, dtype, device, layout)
    c = shape[1] // 2
    scale, shift = _channel_factors(c, device)
    noise = torch.randn(_latent_shape(shape)).to(device, dtype)
    out = vae_sample(m, noise, scaling_factor=scale, shift_factor=shift)
    _check_format(out, m, layout)
    ref = _ref(m, noise, scale.double(), shift.double())
    assert_close(out, ref, dtype, name=f"per-channel {shape}")
    mean = vae_sample(m, sample=False, scaling_factor=scale, shift_factor=shift)
    _check_format(mean, m, layout)
    assert_close(mean, _ref(m, None, scale.double(), shift.double(), sample=False), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_channel_in_kernel_noise_matches_reference(device, layout):
    if not _kernel_runs(device):
        pytest.skip("CPU without the interpreter runs the reference with torch.randn noise")
    shape = (2, 12, 5, 9)
    noise = _noise_of(99, _latent_shape(shape), device)
    m = _moments(shape, torch.float32, device, layout)
    scale, shift = _channel_factors(6, device)
    out = vae_sample(m, seed=99, scaling_factor=scale, shift_factor=shift)
    _check_format(out, m, layout)
    assert_close(out, _ref(m, noise, scale.double(), shift.double()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_channel_mixed_with_a_float(device, layout):
    m = _moments((2, 8, 4, 6), torch.float32, device, layout)
    noise = torch.randn(2, 4, 4, 6, device=device)
    scale, shift = _channel_factors(4, device)
    for s_, h_ in [(scale, 0.25), (0.5, shift)]:
        out = vae_sample(m, noise, scaling_factor=s_, shift_factor=h_)
        ref_s = s_.double() if isinstance(s_, torch.Tensor) else s_
        ref_h = h_.double() if isinstance(h_, torch.Tensor) else h_
        assert_close(out, _ref(m, noise, ref_s, ref_h))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_per_channel_equals_the_float_path_bitwise(device, layout):
    # Same fp32 values, same arithmetic: the per-channel variant changes where they come from.
    m = _moments((2, 8, 6, 5), torch.float32, device, layout)
    noise = torch.randn(2, 4, 6, 5, device=device)
    full = torch.full((4,), 0.13025, device=device)
    shift = torch.full((4,), 0.0625, device=device)
    a = vae_sample(m, noise, scaling_factor=0.13025, shift_factor=0.0625)
    b = vae_sample(m, noise, scaling_factor=full, shift_factor=shift)
    assert torch.equal(a, b)
    assert torch.equal(
        vae_sample(m, seed=4, scaling_factor=0.13025, shift_factor=0.0625),
        vae_sample(m, seed=4, scaling_factor=full, shift_factor=shift),
    )


def test_per_channel_float64_factors_for_a_float64_reference(device):
    m = _moments((1, 8, 3, 3), torch.float64, device)
    noise = torch.randn(1, 4, 3, 3, dtype=torch.float64, device=device)
    scale, shift = _channel_factors(4, device, torch.float64)
    out = vae_sample(m, noise, scaling_factor=scale, shift_factor=shift)
    assert out.dtype == torch.float64
    assert torch.equal(out, _ref(m, noise, scale, shift))


def test_per_channel_gradients_match(device):
    m = _moments((2, 8, 3, 4), torch.float32, device).requires_grad_()
    scale, shift = _channel_factors(4, device)
    scale.requires_grad_()
    noise = torch.randn(2, 4, 3, 4, device=device)
    out = vae_sample(m, noise, scaling_factor=scale, shift_factor=shift)
    g = torch.randn_like(out)
    gm, gs = torch.autograd.grad(out, (m, scale), g)
    m2 = m.detach().double().requires_grad_()
    s2 = scale.detach().double().requires_grad_()
    ref = _ref(m2, noise, s2, shift.double())
    gm_ref, gs_ref = torch.autograd.grad(ref, (m2, s2), g.double())
    assert_close(gm, gm_ref, name="d moments")
    assert_close(gs, gs_ref, name="d scale")


def test_bad_per_channel_factors():
    m = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"scaling_factor must be a real number or a \(4,\)"):
        vae_sample(m, scaling_factor=torch.ones(3))
    with pytest.raises(ValueError, match="shift_factor.*got shape \\(1, 4, 1, 1\\)"):
        vae_sample(m, shift_factor=torch.zeros(1, 4, 1, 1))
    with pytest.raises(ValueError, match="scaling_factor.*got shape \\(\\)"):
        vae_sample(m, scaling_factor=torch.tensor(0.5))
    with pytest.raises(TypeError, match="shift_factor must be a floating tensor"):
        vae_sample(m, shift_factor=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="scaling_factor is on meta"):
        vae_sample(m, scaling_factor=torch.ones(4, device="meta"))
    with pytest.raises(TypeError, match="scaling_factor must be a real number or a"):
        vae_sample(m, scaling_factor=[1.0] * 4)


def test_per_channel_opcheck_and_compile(device):
    m = _moments((2, 8, 3, 5), torch.float32, device, "channels_last")
    noise = torch.randn(2, 4, 3, 5, device=device)
    scale, shift = _channel_factors(4, device)
    for args in [
        (m, noise, 1.0, 0.0, None, True, scale, shift),
        (m, None, 1.0, 0.25, 77, True, scale, None),
        (m, None, 0.5, 0.0, None, False, None, shift),
    ]:
        torch.library.opcheck(torch.ops.sdvae.vae_sample.default, args)

    def f(x, s, h):
        return vae_sample(x * 1.0, seed=5, scaling_factor=s, shift_factor=h) + 0.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(m, scale, shift), f(m, scale, shift))


# ------------------------------------------------------------------- in-kernel noise
def test_same_seed_identical_different_seed_different(device):
    m = _moments((2, 8, 8, 8), torch.float32, device)
    a = vae_sample(m, seed=7)
    assert torch.equal(a, vae_sample(m, seed=7))
    others = [8]
    if _kernel_runs(device):  # the kernel keys Philox on all 64 bits (CPU's mt19937: low 32)
        others += [7 + 2**32, 7 + 2**62]
    for other in others:
        b = vae_sample(m, seed=other)
        assert (a == b).float().mean() < 0.01, other


def test_seed_range_and_wraparound(device):
    m = _moments((1, 8, 4, 4), torch.float32, device)
    for seed in (0, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)):
        assert torch.isfinite(vae_sample(m, seed=seed)).all()
    # Seeds are taken modulo 2**64, like torch.manual_seed.
    assert torch.equal(vae_sample(m, seed=-1), vae_sample(m, seed=2**64 - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noise_is_the_same_for_both_layouts(device, dtype):
    # Keyed on the logical (n, c, h, w) index, not the memory offset.
    m = _moments((3, 8, 5, 7), dtype, device)
    mc = m.contiguous(memory_format=torch.channels_last)
    assert torch.equal(vae_sample(m, seed=11), vae_sample(mc, seed=11))
    torch.manual_seed(5)
    a = vae_sample(m)
    torch.manual_seed(5)
    assert torch.equal(a, vae_sample(mc))


def test_manual_seed_reproduces_and_successive_calls_differ(device):
    m = _moments((2, 8, 6, 6), torch.float32, device)
    torch.manual_seed(123)
    a, b = vae_sample(m), vae_sample(m)
    torch.manual_seed(123)
    c, d = vae_sample(m), vae_sample(m)
    assert torch.equal(a, c) and torch.equal(b, d)
    assert (a == b).float().mean() < 0.01
    torch.manual_seed(124)
    assert (vae_sample(m) == a).float().mean() < 0.01


@pytest.mark.parametrize("layout", LAYOUTS)
def test_key_read_from_device_tensor_equals_key_by_value(device, layout):
    """The CUDA-graph path (Philox key loaded from a tensor) draws exactly the noise of the
    same key passed by value."""
    from sdvae.kernels.vae_sample import _launch

    if not_supported_reasons(torch.empty(1, 2, 1, 1, device=device)):
        pytest.skip("the kernel does not run here (CPU without the interpreter)")
    m = _moments((2, 8, 5, 7), torch.float32, device, layout)
    for key in (0, 12345, 2**62 + 17):
        by_value = vae_sample(m, seed=key, scaling_factor=0.13025, shift_factor=0.1)
        kt = torch.tensor([key], dtype=torch.int64, device=device)
        by_ptr = _launch(m, None, 0.13025, 0.1, None, True, key_tensor=kt)
        assert torch.equal(by_ptr, by_value)


@pytest.mark.cuda
def test_cuda_graph_replay_draws_fresh_noise():
    """seed=None inside a captured CUDA graph: every replay samples new noise, and
    torch.manual_seed before the replays reproduces them."""
    m = _moments((2, 8, 16, 16), torch.float32, "cuda")
    vae_sample(m)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = vae_sample(m)
    runs = []
    for seed in (1, 1):
        torch.manual_seed(seed)
        graph.replay()
        first = out.clone()
        graph.replay()
        runs.append((first, out.clone()))
    (a, b), (c, d) = runs
    assert (a == b).float().mean() < 0.01, "two replays drew the same noise"
    assert torch.equal(a, c) and torch.equal(b, d), "manual_seed did not reproduce the replays"
    std = m[:, 4:].clamp(-30, 20).mul(0.5).exp()
    noise = (b - vae_sample(m, sample=False)) / (std * 0.18215)
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double().flatten()
    y = y.double().flatten()
    x = x - x.mean()
    y = y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


# 5-sigma bounds (two-sided p ~ 6e-7 per check) from each statistic's sampling distribution
# under the null hypothesis of iid N(0, 1): mean ~ N(0, 1/n), sample variance ~ N(1, 2/n),
# skewness ~ N(0, 6/n), excess kurtosis ~ N(0, 24/n), a sample correlation of m independent
# pairs ~ N(0, 1/m), a tail count ~ Binomial(n, p); Kolmogorov-Smirnov at alpha = 1e-3 is
# D * sqrt(n) < 1.949. The seeds are fixed, so the outcome is deterministic, not flaky.
Z = 5.0
STAT_SHAPE = (8, 4, 64, 64)  # 131072 samples


@pytest.mark.parametrize("source", ["seed", "generator"])
def test_in_kernel_noise_statistics(device, source):
    if source == "seed":
        x = _noise_of(2024, STAT_SHAPE, device)
    else:
        torch.manual_seed(2024)
        x = _noise_of(None, STAT_SHAPE, device)
    x = x.double().cpu()
    n = x.numel()
    assert n >= 100_000
    mean = float(x.mean())
    var = float(x.var())
    c = x - mean
    skew = float((c**3).mean() / var**1.5)
    kurt = float((c**4).mean() / var**2 - 3.0)
    assert abs(mean) < Z / math.sqrt(n), mean
    assert abs(var - 1.0) < Z * math.sqrt(2.0 / n), var
    assert abs(skew) < Z * math.sqrt(6.0 / n), skew
    assert abs(kurt) < Z * math.sqrt(24.0 / n), kurt

    # Tails: P(|z| > 3) = 0.0026998.
    p = math.erfc(3.0 / math.sqrt(2.0))
    count = int((x.abs() > 3.0).sum())
    assert abs(count - n * p) < Z * math.sqrt(n * p * (1 - p)), count

    # Kolmogorov-Smirnov against the normal CDF.
    s, _ = torch.sort(x.flatten())
    cdf = 0.5 * torch.erfc(-s / math.sqrt(2.0))
    k = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((k / n - cdf).max()), float((cdf - (k - 1) / n).max()))
    assert d * math.sqrt(n) < 1.949, d

    # Neighbours along every axis: width, height, channel, batch.
    pairs = {
        "w": (x[..., 1:], x[..., :-1]),
        "h": (x[:, :, 1:], x[:, :, :-1]),
        "c": (x[:, 1:], x[:, :-1]),
        "n": (x[1:], x[:-1]),
        # Elements a row-length / channel-plane apart in memory (same counter stride patterns).
        "flat+64": (x.flatten()[64:], x.flatten()[:-64]),
        "flat+4096": (x.flatten()[4096:], x.flatten()[:-4096]),
    }
    for axis, (a, b) in pairs.items():
        r = _corr(a, b)
        assert abs(r) < Z / math.sqrt(a.numel()), (axis, r)


def test_noise_streams_are_uncorrelated_across_seeds_and_calls(device):
    shape = (4, 4, 32, 64)  # 32768 pairs per comparison
    a = _noise_of(1, shape, device).double().cpu()
    b = _noise_of(2, shape, device).double().cpu()
    torch.manual_seed(3)
    g1 = _noise_of(None, shape, device).double().cpu()
    g2 = _noise_of(None, shape, device).double().cpu()
    bound = Z / math.sqrt(a.numel())
    for name, (u, v) in {"seeds": (a, b), "calls": (g1, g2), "seed-vs-gen": (a, g1)}.items():
        assert abs(_corr(u, v)) < bound, name


# -------------------------------------------------------------- dispatch and autograd
def test_not_supported_reasons():
    m = torch.randn(1, 8, 2, 2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert not_supported_reasons(m) == []
    assert any("float64" in r for r in not_supported_reasons(m.double()))
    with torch.enable_grad():
        assert any("grad" in r for r in not_supported_reasons(m.requires_grad_()))
    with torch.no_grad():
        assert not any("grad" in r for r in not_supported_reasons(m))


def test_float64_runs_the_reference(device):
    m = _moments((1, 8, 3, 3), torch.float64, device)
    noise = torch.randn(1, 4, 3, 3, dtype=torch.float64, device=device)
    assert torch.equal(vae_sample(m, noise), _ref(m, noise))


def test_grad_runs_the_reference_and_gradients_match(device):
    m = _moments((2, 8, 3, 4), torch.float32, device).requires_grad_()
    noise = torch.randn(2, 4, 3, 4, device=device)
    out = vae_sample(m, noise, scaling_factor=0.5, shift_factor=0.1)
    assert out.requires_grad
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, m, g)
    m2 = m.detach().double().requires_grad_()
    ref = _ref(m2, noise, 0.5, 0.1)
    (grad_ref,) = torch.autograd.grad(ref, m2, g.double())
    assert_close(grad, grad_ref, name="d moments")


# ----------------------------------------------------------------------- torch.library
def test_registered_op_matches_function(device):
    m = _moments((2, 8, 4, 4), torch.float32, device)
    noise = torch.randn(2, 4, 4, 4, device=device)
    out = torch.ops.sdvae.vae_sample(m, noise, 0.18215, 0.0, None, True)
    assert_close(out, _ref(m, noise))
    assert torch.equal(
        torch.ops.sdvae.vae_sample(m, None, 0.18215, 0.0, 9, True), vae_sample(m, seed=9)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, layout):
    m = _moments((2, 8, 3, 5), torch.float32, device, layout)
    noise = torch.randn(2, 4, 3, 5, device=device)
    for args in [
        (m, noise, 0.18215, 0.0, None, True),
        (m, None, 0.13025, 0.1, 77, True),  # in-kernel noise, fixed seed: deterministic
        (m, None, 0.18215, 0.0, None, False),
    ]:
        torch.library.opcheck(torch.ops.sdvae.vae_sample.default, args)


@pytest.mark.cuda
def test_inductor_compile_fullgraph_on_gpu():
    m = _moments((2, 8, 16, 16), torch.float16, "cuda", "channels_last")

    def f(x, s):
        return vae_sample(x * s, seed=5, scaling_factor=0.13025) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    assert_close(compiled(m, 1.5), f(m, 1.5).double(), torch.float16)
    torch.manual_seed(3)
    a = torch.compile(lambda x: vae_sample(x), fullgraph=True)(m)
    torch.manual_seed(3)
    assert torch.equal(a, vae_sample(m))


def test_compile_fullgraph_has_no_graph_break():
    m = _moments((1, 8, 4, 4), torch.float32, "cpu")

    def f(x):
        return vae_sample(x * 1.0, seed=5) + 0.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(m), f(m))


def test_package_attribute_is_the_function():
    # This module has already imported the submodule sdvae.kernels.vae_sample; the package
    # attribute must still be the function, on every access.
    import sdvae.kernels as K

    for _ in range(2):
        assert K.vae_sample is vae_sample
        assert K.vae_sample_reference is vae_sample_reference


# ------------------------------------------------------------------ dependency direction
def test_kernels_import_nothing_from_the_rest_of_sdvae():
    """DESIGN.md: sdvae -> sdvae.kernels, never back. Each kernel file keeps its reference
    beside its kernel instead of importing one from the package that uses it."""
    import ast
    import pathlib

    import sdvae.kernels

    bad = []
    for path in sorted(pathlib.Path(sdvae.kernels.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    bad.append(f"{path.name}:{node.lineno} imports from above sdvae.kernels")
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                top = name.split(".")
                if top[0] == "sdvae" and top[:2] != ["sdvae", "kernels"]:
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert not bad, "kernels/ imports the package above it:\n" + "\n".join(bad)


def test_the_model_samples_with_the_reference_beside_the_kernel(monkeypatch):
    """One definition: the unfused model's sampling step is vae_sample_reference itself."""
    import importlib

    import sdvae

    module = importlib.import_module("sdvae.kernels.vae_sample")  # the package attr is the op

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return vae_sample_reference(*args, **kwargs)

    monkeypatch.setattr(module, "vae_sample_reference", spy)
    vae = sdvae.VAE(sdvae.VAEConfig.tiny()).eval()
    with torch.no_grad():
        vae.encode(torch.rand(1, 3, 8, 8) * 2 - 1, seed=3)
        vae.encode(torch.rand(1, 3, 8, 8) * 2 - 1, sample=False)
    assert [c["sample"] for c in calls] == [True, False]
    assert all(c["scaling_factor"] == vae.config.scaling_factor for c in calls)


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ModuleNotFoundError
import torch
import sdvae
vae = sdvae.VAE(sdvae.VAEConfig.tiny()).eval()
x = torch.rand(2, 3, 16, 16) * 2 - 1
with torch.no_grad():
    z = vae.encode(x, seed=1)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(vae.encode(x, sample=False), vae.encode(x, sample=False))
    assert vae.decode(z).shape == (2, 3, 16, 16)
import sdvae.kernels as K
m = torch.randn(1, 8, 2, 2)
assert torch.equal(
    K.vae_sample(m, sample=False, scaling_factor=0.5),
    K.vae_sample_reference(m, None, scaling_factor=0.5, shift_factor=0.0, sample=False),
)
from sdvae.kernels.vae_sample import not_supported_reasons
assert any("Triton is not installed" in r for r in not_supported_reasons(m)), "no reason"
try:
    K.group_norm
except ImportError as exc:
    assert "needs Triton" in str(exc), exc
else:
    raise AssertionError("K.group_norm without Triton did not raise")
sdvae.optimize(vae)
assert not vae.fused_sampling and "vae_sample" in vae.fused_reasons
with torch.no_grad():
    assert vae.encode(x, seed=1).shape == (2, 4, 8, 8)
print("ok")
"""


def test_unfused_model_and_reference_work_without_triton():
    """Triton is a Linux-only dependency: without it the unfused model still samples (with
    the reference beside the kernel), and the Triton-only ops say what is missing."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_import_sdvae_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, sdvae; print('triton' in sys.modules, 'sdvae.kernels' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"], proc.stdout


# --------------------------------------------------------------------------- bad input
def test_bad_moments():
    with pytest.raises(ValueError, match="moments.*rank"):
        vae_sample(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="moments.*rank"):
        vae_sample(torch.randn(1, 8, 4, 4, 1))
    with pytest.raises(ValueError, match="moments.*even"):
        vae_sample(torch.randn(1, 7, 4, 4))
    with pytest.raises(TypeError, match="moments.*floating"):
        vae_sample(torch.ones(1, 8, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="moments"):
        vae_sample([[1.0]])


def test_bad_noise():
    m = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="noise.*shape"):
        vae_sample(m, torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="noise.*shape"):
        vae_sample(m, torch.randn(1, 4, 4, 3))
    with pytest.raises(TypeError, match="noise.*dtype"):
        vae_sample(m, torch.randn(1, 4, 4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="noise.*dtype"):
        vae_sample(m, torch.ones(1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise is on meta"):
        vae_sample(m, torch.randn(1, 4, 4, 4, device="meta"))
    with pytest.raises(TypeError, match="noise"):
        vae_sample(m, 0.5)
    with pytest.raises(ValueError, match="noise.*sample=False"):
        vae_sample(m, torch.randn(1, 4, 4, 4), sample=False)


def test_bad_scalars():
    m = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="seed"):
        vae_sample(m, torch.randn(1, 4, 4, 4), seed=1)
    with pytest.raises(TypeError, match="seed"):
        vae_sample(m, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        vae_sample(m, seed=True)
    with pytest.raises(ValueError, match="seed"):
        vae_sample(m, seed=2**64)
    with pytest.raises(TypeError, match="scaling_factor"):
        vae_sample(m, scaling_factor="0.18")
    with pytest.raises(TypeError, match="shift_factor"):
        vae_sample(m, shift_factor=None)
    with pytest.raises(TypeError, match="sample"):
        vae_sample(m, sample=1)


# ------------------------------------------------------------------------ AOT compile
def _aot_configs():
    """Every (dtype, mode, BLOCK_G) variant the launcher can launch."""
    configs = []
    for dt in ("fp32", "fp16", "bf16"):
        sig = {"moments_ptr": f"*{dt}", "noise_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
        sig.update({k: "i32" for k in ("R", "G", "HW", "ch_div")})
        sig.update({"scale": "fp32", "shift": "fp32"})
        sig.update({k: "i32" for k in ("seed_lo", "seed_hi", "base_lo", "base_hi")})
        variants = [(0, False, False), (1, False, False), (2, False, False), (2, True, False)]
        variants += [(2, False, True), (2, True, True)]  # key read from a device tensor
        # Per-channel factors: every variant again (the layout enters through a runtime
        # divisor, so modes 0 and 1 still need no channels_last variant).
        variants = [v + (per_ch,) for per_ch in (False, True) for v in variants]
        for mode, channels_last, key_from_ptr, per_ch in variants:
            for block_g in BLOCK_G_CHOICES:
                block_r, got = block_shape(block_g)
                assert got == block_g
                constexprs = {
                    "MODE": mode,
                    "CHANNELS_LAST": channels_last,
                    "KEY_FROM_PTR": key_from_ptr,
                    "PER_CHANNEL": per_ch,
                    "BLOCK_R": block_r,
                    "BLOCK_G": block_g,
                }
                cfg_sig = dict(sig, key_ptr="*i64" if key_from_ptr else f"*{dt}")
                factor_ptr = "*fp32" if per_ch else f"*{dt}"
                cfg_sig.update(scale_ptr=factor_ptr, shift_ptr=factor_ptr)
                configs.append({"signature": cfg_sig, "constexprs": constexprs, "num_warps": 4})
    return configs


def test_block_shape_choices():
    assert block_shape(1) == (256, 4)
    assert block_shape(4) == (256, 4)
    assert block_shape(5) == (64, 16)
    assert block_shape(1024) == (1, 1024)
    assert block_shape(65536) == (1, 1024)
    assert {block_shape(g)[1] for g in range(1, 3000)} == set(BLOCK_G_CHOICES)


def test_aot_compile_every_variant_for_sm80_and_sm90():
    configs = _aot_configs()
    results = aot_compile("sdvae.kernels.vae_sample", "_vae_sample_kernel", configs)
    assert len(results) == 2 * len(configs) == 2 * 3 * 2 * 6 * len(BLOCK_G_CHOICES)


# --------------------------------------------------------------------------- benchmark
def test_bench_suite_runs_on_cpu():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU suite exists only under the interpreter")
    rows = engine.run(
        engine.Context(device=torch.device("cpu"), quick=True), ["vae_sample"], rep_ms=1
    )
    got = {(r.bench, r.shape, r.dtype, r.layout, r.provider) for r in rows}
    assert got == {
        ("vae_sample", "1x4x8x8", "fp32", "nchw", "eager"),
        ("vae_sample", "1x4x8x8", "fp32", "nchw", "sdvae"),
    }
    assert all(r.median_ms > 0 and r.gbps > 0 for r in rows)


def test_bench_plan_on_gpu_has_the_issue_shapes():
    from sdvae.bench.cases_vae_sample import plan

    ctx = engine.Context(device=torch.device("cuda"), quick=False)  # planning allocates nothing
    labels = {(s, d, p) for s, d, p in plan(ctx)}
    for shape in [(1, 4, 64, 64), (8, 4, 64, 64), (1, 4, 128, 128), (8, 4, 128, 128)]:
        for dtype in (torch.float16, torch.float32):
            for provider in ("eager", "compile", "sdvae"):
                assert (shape, dtype, provider) in labels
