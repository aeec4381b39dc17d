"""The Wan family within a memory budget (sdvae.wan_stream): the banded decode and encode
equal the whole-frame path (float64, every band height, kept frames on the device or
offloaded), the planner's measured peak equals the CPU allocator's own count, a budget picks
bands that hold under it, and bad budgets are refused with the argument named."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import WAN_TINY, allocator_peak

from sdvae import budget, wan_stream
from sdvae.wan import WanVAE

CONFIGS = WAN_TINY


def _model(name: str, dtype=torch.float64) -> WanVAE:
    torch.manual_seed(list(CONFIGS).index(name))
    m = WanVAE(CONFIGS[name]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.to(dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_banded_decode_and_encode_equal_the_whole_frame_path(name):
    """Bands narrower than the halo (1 row), wider (5), kept frames offloaded: the same frames
    and latents as the whole-frame path, to float64 rounding."""
    m = _model(name)
    cfg = m.config
    assert wan_stream.halo(m, "decode") < 24 and wan_stream.halo(m, "encode") < 24
    lat = torch.randn(1, cfg.z_dim, 3, 26, 3, dtype=torch.float64)
    ref = m.decode(lat)
    runs = [(1, None, 0), (5, "cpu", 0), (4, None, 1), (20, "cpu", 3)]  # (rows, offload, split)
    for rows, offload, split in runs:
        out = m.decode(lat, band_rows=rows, offload=offload, band_split=split)
        assert out.shape == ref.shape
        err = (out - ref).abs().max().item()
        assert err <= 1e-12 * ref.abs().max().item(), (rows, offload, split)
    # Nothing keeps a run's whole-frame kept frames alive once it returns.
    gc.collect()
    alive = [b for b in gc.get_objects() if type(b) is wan_stream.BandFrames
             and any(not t.is_meta for t in b.full.values())]  # fmt: skip
    assert not alive
    f = cfg.spatial_factor
    video = torch.rand(1, 3, 9, 26 * f, 2 * f, dtype=torch.float64) * 2 - 1
    ref = m.encode(video)
    for rows, offload, split in ((1, None, None), (7, "cpu", None), (5, None, 2)):
        out = m.encode(video, band_rows=rows, offload=offload, band_split=split)
        err = (out - ref).abs().max().item()
        assert err <= 1e-12 * ref.abs().max().item(), (rows, offload, split)


@pytest.mark.parametrize("offload", ["cpu"])  # the device path: the first decode above
@torch.no_grad()
def test_the_planner_measures_what_the_allocator_counts(offload):
    """The planner runs the executor's own code on the meta device; on the CPU its peak is
    the allocator's (``torch.profiler``) within 2%, whole-frame and banded; a budget between
    the smallest and the whole-frame peak picks bands whose run stays under it."""
    m = _model("wan21", torch.float32)
    lat = torch.randn(1, m.config.z_dim, 3, 40, 8)
    m.decode(lat)  # warm-up
    full_plan = m.memory_plan(lat.shape)
    assert full_plan.path == "full"
    _, peak = allocator_peak(lambda: m.decode(lat))
    assert abs(full_plan.full_bytes - peak) <= 0.02 * peak, (full_plan.full_bytes, peak)
    banded = wan_stream.plan(m, "decode", lat.shape, band_rows=2, offload=offload)
    out, peak = allocator_peak(lambda: m.decode(lat, band_rows=2, offload=offload))
    assert abs(banded.streamed_bytes - peak) <= 0.02 * peak, (banded.streamed_bytes, peak)
    assert banded.streamed_bytes < 0.8 * full_plan.full_bytes

    limit = (banded.streamed_bytes + full_plan.full_bytes) // 2
    plan = m.memory_plan(lat.shape, max_memory=limit, offload=offload)
    assert plan.path == "streamed" and plan.streamed_bytes <= limit
    assert plan.min_bytes <= banded.streamed_bytes
    assert "decoder up_blocks" in plan.describe()
    assert plan.host_bytes > 0  # the kept frames, offloaded
    got, peak = allocator_peak(lambda: m.decode(lat, max_memory=limit, offload=offload))
    assert peak <= limit, (peak, limit)
    assert torch.allclose(got, m.decode(lat), rtol=0, atol=1e-5)


@torch.no_grad()
def test_banded_fused_channels_last_batch_two_equals_its_whole_frame_path():
    """The fused model (frame buffers, folded upsampler, the in-place temporal upsampler) on
    channels_last_3d, batch 2: banded equals its own whole-frame path, float64. The RMS norm
    stays eager (the interpreter is slow); it writes into the same frame buffers."""
    import sdvae

    m = sdvae.optimize(_model("wan21"), channels_last=True)
    for mod in m.modules():
        if type(mod).__name__ == "RMSNorm":
            mod.fused = False
    assert m.memory_format == torch.channels_last_3d
    lat = torch.randn(2, m.config.z_dim, 3, 20, 3, dtype=torch.float64)
    ref = m.decode(lat)
    for rows, split, offload in ((3, 0, None), (5, 2, "cpu")):
        out = m.decode(lat, band_rows=rows, band_split=split, offload=offload)
        err = (out - ref).abs().max().item()
        assert err <= 1e-12 * ref.abs().max().item(), (rows, split, offload)


@torch.no_grad()
def test_plans_follow_the_models_dtype():
    """A plan made before ``model.double()`` is not served after it."""
    m = _model("wan21", torch.float32)
    shape = (1, m.config.z_dim, 2, 8, 4)
    before = m.memory_plan(shape)
    after = m.double().memory_plan(shape)
    assert after.dtype == torch.float64 and after.full_bytes > before.full_bytes


@torch.no_grad()
def test_a_budget_nothing_meets_is_refused_naming_the_smallest_and_bad_options_named():
    m = _model("wan21", torch.float32)
    lat = torch.randn(1, m.config.z_dim, 2, 24, 4)
    with pytest.raises(budget.BudgetError, match="the smallest budget that works is"):
        m.decode(lat, max_memory="1KiB")
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        m.decode(lat, offload="disk")
    with pytest.raises(ValueError, match="band_rows must be a positive int"):
        m.decode(lat, band_rows=0)
    with pytest.raises(ValueError, match="band_split must be an int in 0 .. 4"):
        m.decode(lat, band_rows=1, band_split=5)
    with pytest.raises(ValueError, match="band_split is given without band_rows"):
        m.decode(lat, band_split=1)
    with pytest.raises(ValueError, match="give max_memory or band_rows, not both"):
        m.decode(lat, band_rows=1, max_memory="1GiB")
    with pytest.raises(ValueError, match="max_memory"):
        m.decode(lat, max_memory="lots")
    video = torch.zeros(1, 3, 1, 20, 16)  # 20 rows: not a multiple of 8
    with pytest.raises(ValueError, match="multiples of 8"):
        m.encode(video, band_rows=1)
    m.encode(video, band_rows=1, band_split=2)  # no downsampler before the bands: any height
    with pytest.raises(ValueError, match="band_split must be an int in 0 .. 7"):
        m.encode(video, band_rows=1, band_split=8)
    with pytest.raises(ValueError, match=r"shape must be \(N, 4, T, H, W\)"):
        m.memory_plan((1, 3, 2, 8, 8))


def test_a_budgeted_call_is_an_inference_call():
    m = _model("wan21", torch.float32)
    lat = torch.randn(1, m.config.z_dim, 1, 8, 4)
    with pytest.raises(ValueError, match="inference call"):
        m.decode(lat, max_memory="1GiB")


@torch.no_grad()
def test_a_budgeted_encode_holds_under_the_allocators_count():
    """The encoder's counterpart: a budget between the smallest and the whole-frame peak picks
    a split and bands whose run stays under it, at the allocator's count; the same latents."""
    m = _model("wan21", torch.float32)
    video = torch.rand(1, 3, 5, 8 * 24, 16) * 2 - 1
    ref = m.encode(video)
    plan = m.memory_plan(video.shape, op="encode", max_memory=1, offload="cpu")
    assert plan.path == "none" and plan.min_bytes < plan.full_bytes
    limit = (plan.min_bytes + plan.full_bytes) // 2
    plan = m.memory_plan(video.shape, op="encode", max_memory=limit, offload="cpu")
    assert plan.path == "streamed" and plan.streamed_bytes <= limit, plan.describe()
    got, peak = allocator_peak(lambda: m.encode(video, max_memory=limit, offload="cpu"))
    assert peak <= limit, (peak, limit, plan.describe())
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_runs_last_chunk_keeps_no_frames():
    """Nothing reads what a run's last chunk would keep, so it keeps nothing: a one-frame
    decode (Qwen-Image) or a one-image encode stores no frames at all, and its peak is lower
    than with the frames kept, the planner's equal to the allocator's count (2%); the output
    is the same."""
    from sdvae.wan import ChunkState

    m = _model("wan21", torch.float32)
    lat = torch.randn(1, m.config.z_dim, 1, 40, 8)
    x = m.post_quant_conv(lat)
    state = ChunkState()
    ref = m.decode_chunks(x, state=state)
    assert state.last and not state.frames
    state = ChunkState()
    m.decode_chunks(torch.cat([x, x], 2), state=state)
    assert state.frames  # the first of two chunks kept its frames for the second
    image = torch.rand(1, 3, 1, 8 * 8, 16) * 2 - 1
    state = ChunkState()
    m.encode_chunks(image, state=state)
    assert not state.frames

    m.decode(lat)  # warm-up
    plan = m.memory_plan(lat.shape)
    got, peak = allocator_peak(lambda: m.decode(lat))
    assert abs(plan.full_bytes - peak) <= 0.02 * peak, (plan.full_bytes, peak)
    m.keep_last_frames = True
    try:
        kept, peak_kept = allocator_peak(lambda: m.decode(lat))
    finally:
        m.keep_last_frames = False
    assert peak < 0.9 * peak_kept, (peak, peak_kept)
    assert torch.equal(got, kept) and torch.equal(got, m.decode(lat))
    del ref


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory (in any dim order)."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1) + 1
    return span == t.numel()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
@torch.no_grad()
def test_offloaded_frames_are_stored_rows_outermost(fmt):
    """Offloaded kept frames live in host memory rows-outermost: each band's rows are one
    dense block (one async memcpy each way on CUDA), read back and written as given."""
    frames = wan_stream.BandFrames(8, "cpu", True)
    op = torch.nn.Identity()
    kept = torch.randn(1, 6, 2, 16, 5).contiguous(memory_format=fmt)  # 2 rows per grid row
    frames[op] = kept  # the whole window (a head)
    frames.end_chunk()
    full = frames.full[op]
    assert torch.equal(full, kept) and full.stride(3) > max(full.stride(d) for d in (1, 2, 4))
    band_list = wan_stream.bands(8, 3, 1)
    for j, (lo, hi, a, b) in enumerate(band_list):
        frames.flush(below=lo)
        frames.window(lo, hi, a, b, band_list[j + 1][0] if j + 1 < len(band_list) else 8)
        rows = full[:, :, :, 2 * lo : 2 * hi]
        assert _dense(rows)
        got = frames.get(op)
        assert torch.equal(got, kept[:, :, :, 2 * lo : 2 * hi]) and _dense(got)
        frames[op] = got * 2  # its own rows back (those the next band reads wait)
    frames.end_chunk()
    assert torch.equal(frames.full[op], kept * 2)
