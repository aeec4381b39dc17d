"""The VAE's real shapes on a GPU, for the kernels whose CPU tests use small shapes (the
interpreter is slow): tiles, splits and column blocks that only large shapes reach. Tests that
forbid a conv fallback carry ``graph_conv``: without sdvae's cuDNN graph conv in the build they
skip with the build's reason."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

pytestmark = pytest.mark.cuda

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cout", [128, 200, 512])
@torch.no_grad()
def test_pad_conv2d_many_output_column_blocks(dtype, channels_last, cout):
    from sdvae import ops

    x = torch.randn(2, 136, 33, 31, device="cuda")
    w = torch.randn(cout, 136, 3, 3, device="cuda") / (3 * 136**0.5)
    b = torch.randn(cout, device="cuda")
    ref = F.conv2d(F.pad(x.double(), (0, 1, 0, 1)), w.double(), b.double(), stride=2)
    xx = x.to(dtype)
    if channels_last:
        xx = xx.to(memory_format=torch.channels_last)
    out = ops.pad_conv2d(xx, w.to(dtype), b.to(dtype))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_close(out, ref, dtype)


@pytest.mark.graph_conv
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("channels_last", [True, False])
@torch.no_grad()
def test_pad_conv2d_512_channels_runs_the_cudnn_graph(dtype, channels_last):
    # The encoder's largest-channel downsample (K = 4608) in both layouts: cuDNN takes the graph
    # with pre (0, 0) / post (1, 1) padding, no eager fallback is recorded.
    from sdvae import ops

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 512, 64, 64, device="cuda").to(dtype, memory_format=fmt)
    w = (torch.randn(512, 512, 3, 3, device="cuda") / (3 * 512**0.5)).to(dtype, memory_format=fmt)
    b = torch.randn(512, device="cuda").to(dtype)
    out = ops.pad_conv2d(x, w, b)
    ref = F.conv2d(F.pad(x.double(), (0, 1, 0, 1)), w.double(), b.double(), stride=2)
    assert_close(out, ref, dtype)
    assert not [r for r in ops.fallback_reasons() if r.startswith("pad_conv2d 1x512x64x64")]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (1, 256, 256, 256), (2, 128, 96, 80)])
@torch.no_grad()
def test_group_norm_vae_shapes(dtype, channels_last, shape):
    from sdvae import kernels as K

    x = (torch.randn(shape, device="cuda") * 2 + 5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda")
    b = torch.randn(shape[1], device="cuda")
    out = K.group_norm(x, 32, w, b, 1e-6, silu=True)
    ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("L", [4096, 4100])
@torch.no_grad()
def test_attention_d512_vae_lengths(dtype, L):
    from sdvae import kernels as K

    q, k, v = (torch.randn(1, L, 512, device="cuda", dtype=dtype) for _ in range(3))
    out = K.attention(q, k, v)
    ref = F.scaled_dot_product_attention(
        q.double()[:, None], k.double()[:, None], v.double()[:, None]
    )[:, 0]
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_vae_sample_batch8_latents(dtype):
    from sdvae.kernels.vae_sample import vae_sample_reference

    from sdvae import kernels as K

    m = torch.randn(8, 8, 128, 128, device="cuda").to(dtype)
    noise = torch.randn(8, 4, 128, 128, device="cuda").to(dtype)
    out = K.vae_sample(m, noise)
    ref = vae_sample_reference(
        m.double(), noise.double(), scaling_factor=0.18215, shift_factor=0.0, sample=True
    )
    assert_close(out, ref, dtype)
