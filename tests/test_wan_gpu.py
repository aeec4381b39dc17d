"""The Wan family on a GPU (``cuda`` marker: #25's ``pytest -m cuda`` run; skipped here).

What the CPU tests cannot show: cuDNN's 3-D convs keep channels_last_3d (the layout
``sdvae.dispatch.conv3d`` gives the CPU's results, so that CPU tests run the GPU's paths); the
fused model's error on the GPU against float64, no larger than the unfused model's in the same
dtype; banded decodes with kept frames in pinned host memory, each band's rows one dense block,
equal to the whole-frame decode; and the planner's estimates bounding what the CUDA allocator
holds, whole-frame and within a budget, for videos and for one frame (Qwen-Image)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cuda_peak

import sdvae
from sdvae import _tf32, wan_stream
from sdvae.config import WanConfig
from sdvae.wan import WanVAE

pytestmark = pytest.mark.cuda

#: Every block kind, at widths the GPU kernels take in every dtype (attention head dim 32).
CFG = WanConfig.tiny(base_dim=16)
CL3 = torch.channels_last_3d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(device="cuda", dtype=torch.float32, cfg: WanConfig = CFG) -> WanVAE:
    torch.manual_seed(0)
    m = WanVAE(cfg).eval()
    if cfg is CFG:  # the tiny widths' initial weights are near-trivial
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return m.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@torch.inference_mode()
def test_gpu_conv3d_keeps_channels_last_3d(dtype):
    """cuDNN's conv3d returns channels_last_3d for channels_last_3d operands: the fused path's
    layout with no copy (``dispatch.conv3d`` copies only where it does not)."""
    x = torch.randn(1, 32, 3, 24, 40, device="cuda", dtype=dtype).contiguous(memory_format=CL3)
    w = torch.randn(32, 32, 3, 3, 3, device="cuda", dtype=dtype).contiguous(memory_format=CL3)
    y = torch.nn.functional.conv3d(x, w, None, 1, (0, 1, 1))
    assert y.is_contiguous(memory_format=CL3) and not y.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@torch.inference_mode()
def test_gpu_fused_wan_error_no_larger_than_unfused(dtype):
    """Decode of 3 latent frames and encode of 9 frames: the fused model (RMS norm kernel,
    attention kernel, frame buffers, channels_last_3d) against float64 on the CPU, no more
    than twice the unfused model's error in the same dtype on the GPU (plus 1e-6)."""
    ref = _model("cpu", torch.float64)
    plain = _model("cuda", dtype)
    fused = sdvae.optimize(copy.deepcopy(plain))
    assert fused.memory_format == CL3 and fused.fused_reasons.get("rms_norm") is None
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, CFG.z_dim, 3, 12, 20, generator=g, dtype=torch.float64)
    video = torch.rand(1, 3, 9, 96, 160, generator=g, dtype=torch.float64) * 2 - 1
    for op, x in (("decode", lat), ("encode", video)):
        want = getattr(ref, op)(x)
        x = x.to("cuda", dtype)
        e_plain = _rel(getattr(plain, op)(x).cpu(), want)
        e_fused = _rel(getattr(fused, op)(x).cpu(), want)
        assert e_fused <= 2 * e_plain + 1e-6, (op, e_fused, e_plain)


@torch.inference_mode()
def test_gpu_offloaded_bands_are_pinned_dense_and_equal_the_whole_frame(
    monkeypatch, fp32_precision_restored
):
    """A banded decode with ``offload="cpu"`` keeps its frames in pinned host memory, each
    band's rows one dense block, and gives the whole-frame decode's frames (fp32, TF32 off;
    the bands' convs may take other cuDNN algorithms: 1e-5)."""
    m = sdvae.optimize(_model())
    held = []
    alloc = wan_stream.BandFrames._alloc

    def spy(self, shape, like):
        t = alloc(self, shape, like)
        held.append(t)
        return t

    monkeypatch.setattr(wan_stream.BandFrames, "_alloc", spy)
    lat = torch.randn(1, CFG.z_dim, 3, 24, 20, device="cuda")
    with _tf32.switches(False):  # TF32's rounding would differ between the bands' shapes
        whole = m.decode(lat)
        got = m.decode(lat, band_rows=5, band_split=1, offload="cpu")
    assert held and all(t.device.type == "cpu" and t.is_pinned() for t in held)
    for t in held:
        rows = t[:, :, :, : t.shape[3] // 2]
        span = sum((n - 1) * s for n, s in zip(rows.shape, rows.stride()) if n > 1) + 1
        assert span == rows.numel()
    assert _rel(got, whole) <= 1e-5


@pytest.mark.parametrize("frames", [1, 3], ids=["one_frame", "video"])
@pytest.mark.parametrize("offload", [None, "cpu"])
@torch.inference_mode()
def test_gpu_wan_decode_within_its_plan_and_budget(frames, offload):
    """Wan 2.1's widths (random weights), 384x640, bf16, fused: the whole-frame decode within
    the planner's estimate (its runs on the meta device; cuDNN and the kernels counted by the
    CUDA allocator here); a budget between the smallest plan and the whole-frame estimate
    (meta plans: 531 / 699 MiB for one frame, 661 or 1760 / 2495 MiB for three) runs banded
    within its own estimate and the budget, to the whole-frame result's accuracy against
    fp32."""
    cfg = WanConfig.wan21()
    m = sdvae.optimize(_model(dtype=torch.bfloat16, cfg=cfg))
    ref = _model(cfg=cfg)
    lat = torch.randn(1, cfg.z_dim, frames, 48, 80, device="cuda")
    want = ref.decode(lat)
    x = lat.bfloat16()
    full, full_peak = cuda_peak(lambda: m.decode(x))
    plan = m.memory_plan(x.shape, max_memory=1, offload=offload)
    assert full_peak <= plan.full_bytes, (full_peak, plan.full_bytes)
    limit = (plan.min_bytes + plan.full_bytes) // 2
    plan = m.memory_plan(x.shape, max_memory=limit, offload=offload)
    assert plan.path == "streamed", plan.describe()
    out, peak = cuda_peak(lambda: m.decode(x, max_memory=limit, offload=offload))
    assert peak <= plan.streamed_bytes <= limit, (peak, plan.streamed_bytes, limit)
    assert _rel(out.float(), want) <= 1.5 * _rel(full.float(), want) + 1e-6


@torch.inference_mode()
def test_gpu_first_conv_bias_moves_into_the_second_norm(monkeypatch):
    """On CUDA (ATen's conv3d adds its bias in a pass of its own) every residual block's
    second norm takes the first conv's bias in its loads."""
    from sdvae import dispatch
    from sdvae.wan import ResidualBlock

    fused = sdvae.optimize(_model("cuda", torch.float16))
    blocks, moved = [], []
    real = dispatch.rms_norm

    def spy(*a, input_bias=None, **k):
        moved.append(input_bias is not None)
        return real(*a, input_bias=input_bias, **k)

    monkeypatch.setattr(dispatch, "rms_norm", spy)
    for m in fused.modules():
        if isinstance(m, ResidualBlock):
            m.register_forward_hook(lambda *_: blocks.append(1))
    fused.decode(torch.randn(1, CFG.z_dim, 2, 6, 10, device="cuda", dtype=torch.float16))
    assert blocks and sum(moved) == len(blocks), (sum(moved), len(blocks))
