"""GroupNorm (+ SiLU, + fused input bias / residual): the Triton kernels against a float64
reference on both launch paths, the launch rule, bad input, dispatch, the torch.library ops,
the bench suites and the AOT compile of every configuration the launch rule can pick."""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import aot_compile, assert_close

from sdvae import kernels as K

# The module itself: ``from sdvae.kernels import group_norm`` is the op function.
gn = importlib.import_module("sdvae.kernels.group_norm")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = ["nchw", "channels_last"]
PATHS = ["single", "two_pass"]

# (N, C, spatial, groups): channels per group 2, 3, 16, 1, 3 (1x1 spatial), 3 (1 spatial dim),
# 4 (3 spatial dims), 40 (not a power of two, more than 32); H*W never a power of two but 1x1;
# the last one is large enough for the launch rule to pick two passes under the interpreter.
SHAPES = [
    (2, 8, (5, 7), 4),
    (1, 6, (3, 5), 2),
    (1, 32, (3, 5), 2),
    (1, 4, (2, 3), 4),
    (2, 6, (1, 1), 2),
    (1, 12, (9,), 4),
    (1, 16, (3, 2, 5), 4),
    (1, 80, (3, 3), 2),
    (1, 8, (17, 19), 2),
]
SHAPE_IDS = ["cg2", "cg3", "cg16", "cg1", "1x1", "1d", "3d", "cg40", "two_pass"]


def _device_or_skip(device: str) -> None:
    if device == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors run the eager reference unless TRITON_INTERPRET=1")


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x.contiguous()
    return x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels innermost, any rank


def _input(n, c, spatial, dtype, device, layout, *, mean=0.5, std=2.0):
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * std + mean
    return _to_layout(x.to(device=device, dtype=dtype), layout)


def _vec(c, dtype, device, *, mean=0.0, std=0.5):
    return (mean + std * torch.randn(c, dtype=torch.float64)).to(device=device, dtype=dtype)


def _affine(c, dtype, device):
    return _vec(c, dtype, device, mean=1.0), _vec(c, dtype, device)


def _d(t):
    return None if t is None else t.to(torch.float64)


def _ref(x, groups, w, b, silu, eps=EPS, *, input_bias=None, residual=None, return_sum=False):
    return gn.group_norm_reference(
        _d(x), groups, _d(w), _d(b), eps, silu=silu, input_bias=_d(input_bias),
        residual=_d(residual), return_sum=return_sum,
    )  # fmt: skip


def _check_layout(y, x):
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.stride() == x.stride(), f"strides {y.stride()} != input's {x.stride()}"


def _run(x, groups, w, b, silu, path, **kw):
    """The public function for path None, else the launcher with the path forced."""
    if path is None:
        out = K.group_norm(x, groups, w, b, EPS, silu=silu, **kw)
        return out if kw.get("return_sum") else (out, None)
    args = (kw.get("input_bias"), kw.get("residual"), kw.get("return_sum", False))
    return gn._launch(x, groups, w, b, EPS, silu, *args, path=path)


# ------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_float64_reference(device, shape, dtype, layout):
    """The public function, launch rule's own choice (both paths occur among the shapes)."""
    _device_or_skip(device)
    n, c, spatial, groups = shape
    x = _input(n, c, spatial, dtype, device, layout)
    w, b = _affine(c, dtype, device)
    assert gn.not_supported_reasons(x, groups, w, b, EPS, silu=True) == []
    y = K.group_norm(x, groups, w, b, EPS, silu=True)
    _check_layout(y, x)
    assert_close(y, _ref(x, groups, w, b, True), dtype, name=f"group_norm {shape}")


def test_shapes_cover_both_paths_under_the_interpreter():
    picked = {
        gn.plan(n, c, torch.Size(sp).numel(), g, False, 4, interpret=True).path
        for n, c, sp, g in SHAPES
    }
    assert picked == {"single", "two_pass"}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_each_path_forced(device, shape, layout, path):
    _device_or_skip(device)
    n, c, spatial, groups = shape
    dtype = torch.float32 if path == "single" else torch.bfloat16
    x = _input(n, c, spatial, dtype, device, layout)
    w, b = _affine(c, dtype, device)
    y, s = _run(x, groups, w, b, False, path)
    assert s is None
    _check_layout(y, x)
    assert_close(y, _ref(x, groups, w, b, False), dtype, name=f"{path} {shape}")


# (N, C, spatial, groups, chunks): two passes with the pixel tiles cut into chunks (the
# interpreter's tile is 64 values): several tiles per chunk, an uneven last chunk, a partial
# last tile, several channel blocks.
CHUNK_CASES = [
    (1, 4, (10, 13), 2, 2),
    (2, 6, (7, 19), 2, 3),
    (1, 24, (9, 11), 4, 2),
    (1, 16, (4, 6, 7), 4, 5),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=[f"chunks{i}" for i in range(len(CHUNK_CASES))])
def test_two_pass_chunks_match_reference(device, case, dtype, layout):
    _device_or_skip(device)
    n, c, spatial, groups, chunks = case
    s = torch.Size(spatial).numel()
    p = gn.plan(n, c, s, groups, layout == "channels_last", 4, interpret=True,
                path="two_pass", chunks=chunks)  # fmt: skip
    assert p.chunks > 1 and (p.tiles_per_chunk > 1 or p.cblocks > 1), p
    assert (p.chunks - 1) * p.tiles_per_chunk < p.sblocks <= p.chunks * p.tiles_per_chunk
    x = _input(n, c, spatial, dtype, device, layout)
    w, b = _affine(c, dtype, device)
    ib = _vec(c, torch.float32, device)
    y, _ = gn._launch(x, groups, w, b, EPS, True, ib, path="two_pass", chunks=chunks)
    _check_layout(y, x)
    assert_close(y, _ref(x, groups, w, b, True, input_bias=ib), dtype, name=f"chunks {case}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_fp32_keeps_full_precision(device, layout, path):
    """mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 loses every digit; we must stay at 1e-5."""
    _device_or_skip(device)
    x = _input(1, 16, (6, 11), torch.float32, device, layout, mean=1e4, std=1.0)
    w, b = _affine(16, torch.float32, device)
    y, _ = _run(x, 8, w, b, False, path)
    assert_close(y, _ref(x, 8, w, b, False), torch.float32, name="large mean")
    # The test can tell: the naive one-pass variance in fp32 is far off.
    xg = x.contiguous().reshape(1, 8, -1)
    naive = (xg * xg).mean(-1) - xg.mean(-1) ** 2
    true = xg.double().var(-1, unbiased=False)
    assert ((naive.double() - true).abs() / true).max() > 1e-2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_through_the_fused_sum(device, layout, path):
    """s = x + input_bias + residual with mean 1e4: y is the exact GroupNorm of the s the
    kernel wrote (its fp32 rounding of the sum is the only difference from float64)."""
    _device_or_skip(device)
    x = _input(1, 16, (6, 11), torch.float32, device, layout, mean=1e4, std=1.0)
    r = _input(1, 16, (6, 11), torch.float32, device, "nchw", mean=-3.0, std=0.5)
    ib = _vec(16, torch.float32, device, mean=2.0)
    w, b = _affine(16, torch.float32, device)
    y, s = _run(x, 8, w, b, True, path, input_bias=ib, residual=r, return_sum=True)
    _check_layout(s, x)
    assert_close(s, _ref(x, 8, w, b, True, input_bias=ib, residual=r, return_sum=True)[1],
                 torch.float32, name="sum")  # fmt: skip
    assert_close(y, _ref(s, 8, w, b, True), torch.float32, name="large mean, fused sum")


# (input_bias, residual layout or None, return_sum, silu)
FUSED = [
    (True, None, False, True),
    (False, "same", False, False),
    (True, "same", True, True),
    (True, "other", True, False),
    (False, "other", False, True),
    (False, None, True, True),
]
FUSED_IDS = ["ib", "res", "ib-res-sum", "ib-res_other-sum", "res_other", "sum-only"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fused", FUSED, ids=FUSED_IDS)
def test_fused_inputs_match_reference(device, fused, layout, path):
    _device_or_skip(device)
    has_ib, res_layout, return_sum, silu = fused
    dtype = [torch.float32, torch.float16, torch.bfloat16][FUSED.index(fused) % 3]
    n, c, spatial, groups = 2, 12, (5, 7), 4
    x = _input(n, c, spatial, dtype, device, layout, mean=1.0)
    w, b = _affine(c, dtype, device)
    ib = _vec(c, dtype if has_ib and layout == "nchw" else torch.float32, device, mean=-0.5)
    ib = ib if has_ib else None
    r = None
    if res_layout is not None:
        other = "nchw" if layout == "channels_last" else "channels_last"
        r = _input(n, c, spatial, dtype, device, layout if res_layout == "same" else other)
    y, s = _run(x, groups, w, b, silu, path, input_bias=ib, residual=r, return_sum=return_sum)
    ref = _ref(x, groups, w, b, silu, input_bias=ib, residual=r, return_sum=True)
    _check_layout(y, x)
    assert_close(y, ref[0], dtype, name="y")
    if return_sum:
        _check_layout(s, x)
        assert_close(s, ref[1], dtype, name="s")
    else:
        assert s is None


def test_public_function_returns_the_sum_on_request(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 5), torch.float16, device, "channels_last")
    r = _input(1, 8, (3, 5), torch.float16, device, "nchw")
    ib = _vec(8, torch.float16, device)
    out = K.group_norm(x, 4, input_bias=ib, residual=r, return_sum=True)
    assert isinstance(out, tuple) and len(out) == 2
    ref = _ref(x, 4, None, None, False, input_bias=ib, residual=r, return_sum=True)
    for got, want, name in zip(out, ref, ("y", "s"), strict=True):
        _check_layout(got, x)
        assert_close(got, want, torch.float16, name=name)
    y = K.group_norm(x, 4, input_bias=ib, residual=r)
    assert isinstance(y, torch.Tensor)
    assert_close(y, ref[0], torch.float16)


@pytest.mark.parametrize("has_b", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("has_w", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_optional_and_fp32_affine(device, dtype, has_w, has_b):
    """weight/bias absent, or fp32 beside a half-precision x."""
    _device_or_skip(device)
    x = _input(2, 12, (5, 3), dtype, device, "channels_last", mean=-1.0)
    w, b = _affine(12, torch.float32, device)
    w = w if has_w else None
    b = b if has_b else None
    y = K.group_norm(x, 3, w, b, EPS, silu=True)
    _check_layout(y, x)
    assert_close(y, _ref(x, 3, w, b, True), dtype, name="affine")


def test_other_strides_are_made_contiguous(device):
    _device_or_skip(device)
    base = torch.randn(2, 8, 6, 10, device=device) + 1.0
    x = base[:, :, :, ::2]  # neither NCHW- nor channels_last-contiguous
    r = torch.randn(2, 8, 5, 6, device=device).transpose(2, 3)  # nor this one
    assert gn._layout(x) is None and gn._layout(r) is None
    w, b = _affine(8, torch.float32, device)
    y = K.group_norm(x, 4, w, b, EPS, silu=True, residual=r)
    assert y.is_contiguous()
    assert_close(y, _ref(x, 4, w, b, True, residual=r), torch.float32)


def test_eps_is_used(device):
    _device_or_skip(device)
    x = _input(1, 4, (3, 3), torch.float32, device, "nchw", std=0.05)
    y = K.group_norm(x, 2, eps=0.01)
    assert_close(y, _ref(x, 2, None, None, False, eps=0.01), torch.float32)


def test_empty_batch(device):
    _device_or_skip(device)
    x = torch.randn(0, 8, 3, 3, device=device)
    assert K.group_norm(x, 4).shape == (0, 8, 3, 3)
    y, s = K.group_norm(x, 4, residual=torch.randn(0, 8, 3, 3, device=device), return_sum=True)
    assert y.shape == s.shape == (0, 8, 3, 3)


# ------------------------------------------------------------------ offsets past 2^31
# Tensors of 2^31 values and more cannot be run through the interpreter (it would take hours)
# but single programs of the real kernels can, on the real shapes: an uninitialised CPU tensor
# of several GiB costs only the pages a test touches (the allocator maps them lazily), and the
# interpreter computes the kernels' int32 products exactly as the GPU does, wrap included. Each
# tensor sits 2^31 values into a larger buffer, so that an offset that wraps negative still
# lands inside memory the test owns: the test then fails on a wrong value instead of crashing.
_LEAD = 2**31


def _lazy_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as exc:  # e.g. a kernel that refuses to overcommit
        pytest.skip(f"cannot map {numel * dtype.itemsize / 2**30:.0f} GiB lazily here: {exc}")


# (x layout, residual (x itself, read a second time), input bias)
SHIFT_CASES = [("nchw", False, False), ("nchw", True, True), ("channels_last", True, True)]


@pytest.mark.skipif(not INTERPRET, reason="runs the kernel in Triton's interpreter")
@pytest.mark.parametrize("case", SHIFT_CASES, ids=["nchw", "nchw-res-ib", "cl-res-ib"])
def test_group_shift_reads_its_group_past_2_31_values(case):
    """(1, 256, 4096, 4096) fp16, 32 groups (the first norm of the last decoder block at a
    4096^2 decode): the shift K of the last groups sits (C - C/G) * S >= 2^31 values into x.
    The finalize kernel (one program per group, which reads K and no other value of x) runs
    on that tensor in the interpreter with given partial statistics; every channel's K must be
    ``(x + residual) + input_bias`` at its group's first channel and pixel, bit for bit. Before
    the fix ``gc * S`` was an int32 product: groups 16 to 31 read up to 4 GiB before x."""
    layout, res, has_ib = case
    n, c, h, w, groups = 1, 256, 4096, 4096, 32
    s, cg = h * w, c // groups
    assert (c - cg) * s >= 2**31
    buf = _lazy_buffer(_LEAD + n * c * s, torch.float16)
    if layout == "nchw":
        x = buf[_LEAD:].view(n, c, h, w)
    else:
        x = buf[_LEAD:].view(n, h, w, c).permute(0, 3, 1, 2)
    r = x if res else None
    firsts = torch.arange(groups) * cg
    x[0, firsts, 0, 0] = (torch.randn(groups) * 2 + 3).half()
    ib = _vec(c, torch.float32, "cpu", mean=0.5) if has_ib else None
    want = x[0, firsts, 0, 0].float()
    if r is not None:
        want = want + r[0, firsts, 0, 0].float()
    if ib is not None:
        want = want + ib[firsts]
    want = want.repeat_interleave(cg)
    chunks = 3
    part = torch.rand(2 * n * c * chunks) + 0.5  # (mean, M2) per channel and chunk
    coef = torch.full((3 * n * c,), float("nan"))
    gn._gn_finalize_kernel[(n * groups,)](
        x, x if ib is None else ib, x if r is None else r, x, x, part, coef,
        n, c, s, cg, groups, chunks, -(-s // chunks), EPS,
        BLOCK=gn.INTERPRET_FINALIZE_BLOCK, CL=layout != "nchw", HAS_IB=ib is not None,
        HAS_RES=r is not None, HAS_W=False, HAS_B=False, num_warps=gn.FINALIZE_WARPS,
    )  # fmt: skip
    k = coef[: n * c]
    bad = (k != want).nonzero().flatten()
    assert bad.numel() == 0, (
        f"K wrong for channels {bad.tolist()[:8]}... (groups "
        f"{sorted({int(i) // cg for i in bad})}): got {k[bad[:4]].tolist()}, "
        f"want {want[bad[:4]].tolist()}"
    )
    assert torch.isfinite(coef).all()


@pytest.mark.skipif(not INTERPRET, reason="runs the kernel in Triton's interpreter")
def test_apply_reads_the_scratch_rows_past_2_31_values():
    """N * C = 2^30 (accepted: the per-lane scratch index n*C + c stays int32): the apply
    kernel's a and d rows start N*C and 2*N*C values into the (3, N, C) scratch, and 2*N*C is
    2^31. One program of the apply kernel runs on channel block 0 of sample 0 with K = 0,
    a = 1, d = 7, and a marker -3 where an int32 offset would wrap to (2^31 values before the
    scratch): y must be 7. Before the fix ``2 * nc`` was an int32 product and y read -3."""
    n, c, s = 2**15, 2**15, 1
    assert gn.not_supported_reasons(torch.empty(n, c, s, device="meta"), 1) == []
    p = gn.plan(n, c, s, 1, False, 1)
    assert p.path == "two_pass"
    nc, bc = n * c, p.block_c
    buf = _lazy_buffer(_LEAD + 3 * nc, torch.float32)
    coef = buf[_LEAD:]
    coef[:bc], coef[nc : nc + bc], coef[2 * nc : 2 * nc + bc] = 0.0, 1.0, 7.0
    buf[:bc] = -3.0
    x = _lazy_buffer(nc * s, torch.float16).view(n, c, s)
    x[0, :bc] = 0.0
    y = _lazy_buffer(nc * s, torch.float16).view(n, c, s)
    y[0, :bc] = float("nan")
    gn._gn_apply_kernel[(1,)](
        x, x, x, coef, y, y, n, c, s, p.cblocks, p.chunks, p.tiles_per_chunk,
        BLOCK_C=bc, BLOCK_S=p.block_s, CL=False, HAS_IB=False, HAS_RES=False,
        SILU=False, WRITE_SUM=False, num_warps=p.num_warps,
    )  # fmt: skip
    got = y[0, :bc, 0].float()
    assert torch.equal(got, torch.full_like(got, 7.0)), got[:4].tolist()


@pytest.mark.skipif(not INTERPRET, reason="runs the kernel in Triton's interpreter")
def test_apply_padding_slots_stay_off_just_under_2_31_pixels():
    """S = 2^31 - 4 * TILE - 1, the most pixels the kernels take: the launch rule cuts the
    tiles into chunks whose last one is short, and the apply kernel's first ``chunks``
    programs each take their chunk's last tile, so one of them gets a padding slot. Its pixel
    index, unclamped, is past 2^31: as an int32 it wrapped negative, passed the
    ``s0 + ds < S`` mask and wrote a tile 4 GiB before y. That holds for the GPU plans of
    132 SMs (H100/H200) and of 16 (Jetson AGX Orin); the interpreter runs the latter's 48
    programs (the former's 396 take several times longer) on the real tensor (y = x in place,
    K = 0, a = 1, d = 7): the real tiles hold 7 afterwards, the buffer before the tensor
    nothing."""
    n, c, groups = 1, 1, 1
    s = 2**31 - 4 * gn.TILE - 1
    for sms in (132, 16):
        p = gn.plan(n, c, s, groups, False, sms)
        assert p.path == "two_pass" and p.chunks * p.tiles_per_chunk > p.sblocks, p
        assert (p.chunks * p.tiles_per_chunk - 1) * p.block_s >= 2**31, p  # unclamped s0
    buf = _lazy_buffer(_LEAD + n * c * s, torch.float16)
    x = buf[_LEAD:].view(n, c, s)
    lead = buf[:_LEAD].view(torch.int64)
    assert not lead.any()  # freshly mapped pages read as zero
    coef = torch.tensor([0.0, 1.0, 7.0])  # K, a, d of the one channel
    programs = n * p.cblocks * p.chunks  # the last tile of every chunk
    gn._gn_apply_kernel[(programs,)](
        x, x, x, coef, x, x, n, c, s, p.cblocks, p.chunks, p.tiles_per_chunk,
        BLOCK_C=p.block_c, BLOCK_S=p.block_s, CL=False, HAS_IB=False, HAS_RES=False,
        SILU=False, WRITE_SUM=False, num_warps=p.num_warps,
    )  # fmt: skip
    written = int(torch.count_nonzero(lead))
    assert written == 0, f"{written} 8-byte words written before the tensor"
    tiles = x.view(-1)[: (p.sblocks - 1) * p.block_s].view(-1, p.block_s)
    last = torch.arange(p.chunks - 1) * p.tiles_per_chunk + p.tiles_per_chunk - 1
    assert (tiles[last] == 7).all()
    assert not tiles[last - 1].any() and not tiles[last + 1].any()  # one tile per program


def test_int32_limits_send_the_call_to_the_reference():
    """What the kernels index in int32 is checked before launching: pixels per sample (up to
    2^31 - 4 * TILE) and N * C (the per-channel scratch). The 4096^2 decode shape is inside."""
    assert gn.not_supported_reasons(torch.empty(1, 256, 4096, 4096, device="meta"), 32) == []
    s = 2**31 - 4 * gn.TILE
    assert gn.not_supported_reasons(torch.empty(1, 1, s - 1, device="meta"), 1) == []
    reasons = gn.not_supported_reasons(torch.empty(1, 1, s, device="meta"), 1)
    assert any("pixel indices are int32" in r for r in reasons)
    assert gn.not_supported_reasons(torch.empty(2**21, 1023, 1, device="meta"), 1) == []
    assert gn.plan(2**15, 2**15, 1, 1, False, 132).path == "two_pass"  # the scratch is used
    reasons = gn.not_supported_reasons(torch.empty(2**21, 1024, 1, device="meta"), 32)
    assert any("N * C >= 2^31" in r for r in reasons)


# -------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(512, 64), (512, 128), (256, 512), (128, 1024)])
def test_plan_fills_an_h200_at_vae_shapes(shape, layout):
    c, hw = shape
    cl = layout == "channels_last"
    p = gn.plan(1, c, hw * hw, 32, cl, 132)
    assert p.path == "two_pass" and p.num_warps == gn.NUM_WARPS
    assert p.block_c * p.block_s == gn.TILE
    assert (p.block_c == 128 if c == 128 else p.block_c >= 256) if cl else p.block_s == gn.TILE
    grids = p.grids(1, 32)
    assert grids["stats"] >= 132 * gn.STATS_PROGRAMS_PER_SM // 2, p
    assert (p.chunks - 1) * p.tiles_per_chunk < p.sblocks <= p.chunks * p.tiles_per_chunk
    assert grids["apply"] >= p.cblocks * p.sblocks  # every tile has its program


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_programs_per_sm_follow_the_rule(layout):
    """The wave is 3 programs per SM for plain 2-byte values, 2 for fp32 or with an
    input_bias or a residual; the statistics pass fills it (up to the chunks that trimming
    empty ones takes off) and passes it by fewer than one row of chunks (module header)."""
    cl = layout == "channels_last"
    for kw, per_sm in [
        ({}, gn.STATS_PROGRAMS_PER_SM),
        ({"fused_inputs": True}, gn.STATS_PROGRAMS_PER_SM_WIDE),
        ({"itemsize": 4}, gn.STATS_PROGRAMS_PER_SM_WIDE),
    ]:
        p = gn.plan(1, 128, 1024 * 1024, 32, cl, 132, **kw)
        rows = p.cblocks
        assert p.wave == per_sm * 132
        assert 0.9 * p.wave <= p.grids(1, 32)["stats"] < p.wave + rows, (kw, p)


# (C, fused inputs): the NCHW shapes the floor left under one wave on 132 SMs (256 rows
# at one chunk: 256 programs for 396; 128 rows with an input bias at two: 256 for 264).
UNDERFILLED = [(256, False), (128, True), (128, False), (512, False), (512, True)]


@pytest.mark.parametrize("c,fused", UNDERFILLED, ids=[f"C{c}{'-ib' * f}" for c, f in UNDERFILLED])
@pytest.mark.parametrize("hw", [256, 512, 1024])
def test_stats_chunks_fill_the_wave_from_above(c, fused, hw):
    """chunks = cdiv(wave, rows) while the rows fit in a wave: at least one full wave of
    statistics programs, never more than one row of chunks past it; 4 waves or more when the
    rows alone pass a wave."""
    p = gn.plan(1, c, hw * hw, 32, False, 132, fused_inputs=fused)
    stats = p.grids(1, 32)["stats"]
    rows = p.cblocks
    assert rows == c  # NCHW at these sizes: one channel per tile row
    if rows <= p.wave:
        assert p.wave <= stats < p.wave + rows, p
    else:
        assert stats >= gn.STATS_MIN_WAVES * p.wave, p
    assert {(256, False): 512, (128, True): 384}.get((c, fused), stats) == stats


def test_describe_plan_shows_the_stats_waves(monkeypatch):
    monkeypatch.setattr(gn, "_num_sms", lambda device: 132)
    x = torch.empty(1, 256, 512, 512, dtype=torch.float16)
    text = gn.describe_plan(x, 32)
    p = gn.plan(1, 256, 512 * 512, 32, False, 132, interpret=True)
    assert f"stats {p.chunks * 256} (" in text and f"waves of {p.wave})" in text, text
    assert p.wave == gn.STATS_PROGRAMS_PER_SM * 132 and p.chunks * 256 >= p.wave, text


def test_plan_picks_one_launch_when_the_group_fits():
    assert gn.plan(64, 512, 4 * 4, 32, False, 132).path == "single"  # 16 x 16 values
    p = gn.plan(8, 512, 32 * 32, 32, True, 132)  # 16 x 1024: exactly SINGLE_MAX
    assert p.path == "single" and p.block == gn.SINGLE_MAX and p.num_warps == 16
    assert gn.plan(1, 512, 64 * 64, 32, True, 132).path == "two_pass"
    assert gn.plan(1, 6, 5, 2, False, 132).block == 64  # blocks are at least 64 values


def test_plan_forced_paths_and_bad_force():
    assert gn.plan(1, 512, 64 * 64, 32, False, 132, path="two_pass").path == "two_pass"
    assert gn.plan(1, 8, 35, 4, False, 4, interpret=True, path="single").path == "single"
    with pytest.raises(ValueError, match="path"):
        gn.plan(1, 8, 35, 4, False, 4, path="three_pass")
    with pytest.raises(ValueError, match="one-launch"):
        gn.plan(1, 512, 512 * 512, 32, False, 132, path="single")


def test_describe_plan_names_the_choice():
    x = torch.randn(1, 16, 24, 24).to(memory_format=torch.channels_last)
    text = gn.describe_plan(x, 4)
    assert text.startswith("two_pass") and "stats" in text and "apply" in text
    assert gn.describe_plan(torch.randn(1, 8, 2, 2), 4).startswith("single")


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: K.group_norm(x, 3), ValueError, "num_groups"),
        (lambda x: K.group_norm(x, 0), ValueError, "num_groups"),
        (lambda x: K.group_norm(x, 2.0), TypeError, "num_groups"),
        (lambda x: K.group_norm(x, 4, torch.ones(7)), ValueError, "weight"),
        (lambda x: K.group_norm(x, 4, None, torch.ones(8, 1)), ValueError, "bias"),
        (lambda x: K.group_norm(x[0, 0], 1), ValueError, "x must have rank"),
        (lambda x: K.group_norm(x[None, None], 4), ValueError, "x must have rank"),
        (lambda x: K.group_norm(x.numpy(), 4), TypeError, "x must be a torch.Tensor"),
        (lambda x: K.group_norm(x.int(), 4), TypeError, "x must be a floating"),
        (lambda x: K.group_norm(x, 4, torch.ones(8, device="meta")), ValueError, "weight is on"),
        (lambda x: K.group_norm(x, 4, None, torch.ones(8, device="meta")), ValueError, "bias is"),
        (lambda x: K.group_norm(x.half(), 4, torch.ones(8).double()), TypeError, "weight"),
        (lambda x: K.group_norm(x, 4, eps=-1.0), ValueError, "eps"),
        (lambda x: K.group_norm(x, 4, input_bias=torch.ones(4)), ValueError, "input_bias"),
        (lambda x: K.group_norm(x, 4, input_bias=[1.0] * 8), TypeError, "input_bias"),
        (lambda x: K.group_norm(x, 4, input_bias=torch.ones(8, device="meta")), ValueError,
         "input_bias is on"),
        (lambda x: K.group_norm(x.half(), 4, input_bias=torch.ones(8).double()), TypeError,
         "input_bias"),
        (lambda x: K.group_norm(x, 4, residual=x[:1]), ValueError, "residual must have"),
        (lambda x: K.group_norm(x, 4, residual=x.double()), TypeError, "residual must have"),
        (lambda x: K.group_norm(x.half(), 4, residual=x), TypeError, "residual"),
        (lambda x: K.group_norm(x, 4, residual=x.numpy()), TypeError, "residual"),
        (lambda x: K.group_norm(x, 4, residual=x.to("meta")), ValueError, "residual is on"),
    ],
    ids=[
        "indivisible", "zero-groups", "float-groups", "weight-size", "bias-size", "rank2",
        "rank6", "numpy", "int", "weight-device", "bias-device", "weight-dtype", "eps",
        "input_bias-size", "input_bias-list", "input_bias-device", "input_bias-dtype",
        "residual-shape", "residual-dtype", "residual-fp32-for-half", "residual-numpy",
        "residual-device",
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(exc, match=match):
        call(x)


def test_not_supported_reasons_checks_the_new_arguments_too():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="residual"):
        gn.not_supported_reasons(x, 4, residual=torch.randn(2, 8, 3, 4))
    with pytest.raises(ValueError, match="input_bias"):
        gn.not_supported_reasons(x, 4, input_bias=torch.randn(9))


@pytest.mark.cuda
def test_mixed_cuda_cpu_devices_raise():
    x = torch.randn(1, 8, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        K.group_norm(x, 4, torch.ones(8))
    with pytest.raises(ValueError, match="residual is on cpu"):
        K.group_norm(x, 4, residual=torch.ones(1, 8, 3, 3))
    with pytest.raises(ValueError, match="input_bias is on cpu"):
        K.group_norm(x, 4, input_bias=torch.ones(8))


# -------------------------------------------------------------------------- dispatch
def test_package_attribute_is_the_op_in_any_import_order():
    importlib.import_module("sdvae.kernels.group_norm")  # rebinds K.group_norm to the module
    x = _input(1, 4, (2, 3), torch.float32, "cpu", "nchw")
    ref = gn.group_norm_reference(x, 2, silu=True)
    assert callable(K.group_norm) and K.group_norm_reference is gn.group_norm_reference
    assert_close(K.group_norm(x, 2, silu=True), ref.double(), torch.float32)


def test_cpu_without_interpreter_runs_reference_and_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = _input(1, 8, (4, 4), torch.float32, "cpu", "nchw")
    r = torch.randn_like(x)
    reasons = gn.not_supported_reasons(x, 4, residual=r)
    assert any("TRITON_INTERPRET" in r for r in reasons)
    y, s = K.group_norm(x, 4, silu=True, residual=r, return_sum=True)
    want = gn.group_norm_reference(x, 4, silu=True, residual=r, return_sum=True)
    assert torch.equal(y, want[0]) and torch.equal(s, want[1])


def test_float64_runs_reference_and_says_why():
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    assert any("float64" in r for r in gn.not_supported_reasons(x, 4))
    assert torch.equal(K.group_norm(x, 4), gn.group_norm_reference(x, 4))


def test_inputs_requiring_grad_run_the_differentiable_reference():
    x = _input(1, 8, (3, 3), torch.float32, "cpu", "nchw").requires_grad_()
    w, b = _affine(8, torch.float32, "cpu")
    ib = _vec(8, torch.float32, "cpu").requires_grad_()
    r = torch.randn(1, 8, 3, 3).requires_grad_()
    w.requires_grad_()
    assert any("grad" in r for r in gn.not_supported_reasons(x, 4, w, b, input_bias=ib))
    y, s = K.group_norm(x, 4, w, b, silu=True, input_bias=ib, residual=r, return_sum=True)
    (y.square().sum() + s.sum()).backward()
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, ib, r)]
    x2, w2, ib2, r2 = leaves
    y2, s2 = gn.group_norm_reference(
        x2, 4, w2, b, silu=True, input_bias=ib2, residual=r2, return_sum=True
    )
    (y2.square().sum() + s2.sum()).backward()
    for got, want, name in zip((x, w, ib, r), leaves, ("x", "weight", "input_bias", "residual")):
        assert_close(got.grad, want.grad.double(), torch.float32, name=f"{name}.grad")


# ------------------------------------------------------------------- torch.library ops
def test_torch_library_op_matches_and_backpropagates(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 5), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device)
    ib = _vec(8, torch.float32, device)
    y = torch.ops.sdvae.group_norm(x, 4, w, b, EPS, True)
    _check_layout(y, x)
    assert_close(y, _ref(x, 4, w, b, True), torch.float32)
    y = torch.ops.sdvae.group_norm(x, 4, w, b, EPS, True, ib, x)
    assert_close(y, _ref(x, 4, w, b, True, input_bias=ib, residual=x), torch.float32)
    xr = x.detach().clone().requires_grad_()
    ibr = ib.detach().clone().requires_grad_()
    torch.ops.sdvae.group_norm(xr, 4, w, None, EPS, True, ibr).sum().backward()
    xr2 = x.detach().clone().requires_grad_()
    ibr2 = ib.detach().clone().requires_grad_()
    gn.group_norm_reference(xr2, 4, w, None, EPS, silu=True, input_bias=ibr2).sum().backward()
    assert_close(xr.grad, xr2.grad.double(), torch.float32, name="x.grad")
    assert_close(ibr.grad, ibr2.grad.double(), torch.float32, name="input_bias.grad")


def test_sum_op_returns_both_and_backpropagates(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 5), torch.float32, device, "nchw")
    r = _input(1, 8, (3, 5), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device)
    y, s = torch.ops.sdvae.group_norm_sum(x, 4, w, b, EPS, False, None, r)
    ref = _ref(x, 4, w, b, False, residual=r, return_sum=True)
    assert_close(y, ref[0], torch.float32, name="y")
    assert_close(s, ref[1], torch.float32, name="s")
    rr = r.detach().clone().requires_grad_()
    y, s = torch.ops.sdvae.group_norm_sum(x, 4, w, b, EPS, False, None, rr)
    s.sum().backward()  # only s used: y's gradient is None
    assert torch.equal(rr.grad, torch.ones_like(r))


def test_opcheck(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 3), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device)
    ib = _vec(8, torch.float32, device)
    r = _input(1, 8, (3, 3), torch.float32, device, "nchw")
    for args in [
        (x, 4, w, b, EPS, True),
        (x.contiguous(), 2, None, None, 1e-5, False),
        (x, 4, w, b, EPS, True, ib, r),
    ]:
        torch.library.opcheck(torch.ops.sdvae.group_norm.default, args)
    torch.library.opcheck(torch.ops.sdvae.group_norm_sum.default, (x, 4, w, b, EPS, True, ib, r))


def test_compiles_without_graph_break(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 3), torch.float32, device, "nchw")
    r = _input(1, 8, (3, 3), torch.float32, device, "channels_last")
    ib = _vec(8, torch.float32, device)

    def f(t, res, bias):
        y = K.group_norm(t * 2, 4, silu=True) + 1
        y2, s = K.group_norm(t, 4, silu=True, input_bias=bias, residual=res, return_sum=True)
        return y, y2, s

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, r, ib)
    assert_close(out[0], _ref(x * 2, 4, None, None, True) + 1, torch.float32)
    ref = _ref(x, 4, None, None, True, input_bias=ib, residual=r, return_sum=True)
    assert_close(out[1], ref[0], torch.float32)
    assert_close(out[2], ref[1], torch.float32)


# ------------------------------------------------------------------------- the bench
def test_bench_suites_run_on_cpu():
    if not INTERPRET:
        pytest.skip("the CPU bench rows need TRITON_INTERPRET=1")
    from sdvae.bench import engine

    ctx = engine.Context(device=torch.device("cpu"), quick=True)
    rows = engine.run(ctx, ["group_norm_silu", "group_norm_fused"], rep_ms=1)
    got = {(r.bench, r.layout, r.provider) for r in rows}
    assert got == {
        (bench, lo, p)
        for bench in ("group_norm_silu", "group_norm_fused")
        for lo in LAYOUTS
        for p in ("eager", "sdvae")
    }
    assert all(r.dtype == "fp32" and r.median_ms > 0 and r.gbps > 0 for r in rows)


def test_bench_providers_on_a_gpu_include_both_compile_modes():
    from sdvae.bench import cases_group_norm as cases
    from sdvae.bench.engine import Context

    ctx = Context(device=torch.device("cuda"), quick=True)
    names = cases.providers(ctx)
    assert names[0] == "eager" and names[-1] == "sdvae"
    modes = {cases.COMPILE_PROVIDERS[p] for p in names if p.startswith("compile")}
    assert modes == {"default", "max-autotune-no-cudagraphs"}
    ctx = Context(device=torch.device("cuda"), quick=True, compile_mode="reduce-overhead")
    assert "compile-reduce-overhead" in cases.providers(ctx)


def test_bench_shapes_are_the_design_shapes():
    from sdvae.bench import cases_group_norm as cases

    want = {(512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512)}
    want |= {(c, 2 * hw) for c, hw in want}
    assert set(cases.SHAPES) == want and len(cases.SHAPES) == len(want)


# ---------------------------------------------------------------------- AOT compile
_ROLES = {  # argument name -> what it points to ("x": x's dtype, "w": the affine dtype)
    "x_ptr": "x", "ib_ptr": "w", "r_ptr": "x", "w_ptr": "w", "b_ptr": "w", "y_ptr": "x",
    "sum_ptr": "x", "part_ptr": "fp32", "coef_ptr": "fp32", "eps": "f",
}  # fmt: skip
_ARGS = {
    "single": "x_ptr ib_ptr r_ptr w_ptr b_ptr y_ptr sum_ptr C S Cg G eps",
    "stats": "x_ptr ib_ptr r_ptr part_ptr N C S Cg cblocks chunks tiles_per_chunk",
    "finalize": "x_ptr ib_ptr r_ptr w_ptr b_ptr part_ptr coef_ptr N C S Cg G chunks chunk_s eps",
    "apply": "x_ptr ib_ptr r_ptr coef_ptr y_ptr sum_ptr N C S cblocks chunks tiles_per_chunk",
}
_FLAGS = {
    "single": ("HAS_IB", "HAS_RES", "HAS_W", "HAS_B", "SILU", "WRITE_SUM"),
    "stats": ("HAS_IB", "HAS_RES"),
    "finalize": ("HAS_IB", "HAS_RES", "HAS_W", "HAS_B"),
    "apply": ("HAS_IB", "HAS_RES", "SILU", "WRITE_SUM"),
}
# Rotated over the tiles, so every dtype pairing and flag value is compiled: (x dtype, affine
# dtype, flags on, residual forced on, S/C/Cg divisible by 16).
_VARIANTS = [
    ("fp16", "fp32", True, False, True),
    ("bf16", "bf16", False, False, False),
    ("fp32", "fp32", True, True, True),
    ("fp16", "fp16", True, True, False),
    ("bf16", "fp32", False, False, True),
]


def _pickable_tiles():
    """Every tile the launch rule can pick for its two-pass kernels (TILE, MIN_BLOCK), found
    by running the rule over channel and pixel counts from 1 to 2 * TILE, and every one-launch
    block."""
    two, single = set(), set()
    sizes = [1 << k for k in range(14)] + [3, 5, 40, 100, 1000, 5000]
    for cl in (False, True):
        for c in sizes:
            for s in sizes:
                for groups in {1, c}:
                    p = gn.plan(1, c, s, groups, cl, 132)
                    if p.path == "single":
                        single.add((cl, p.block, p.num_warps))
                    else:
                        two.add((cl, p.block_c, p.block_s))
    return sorted(two), sorted(single)


def _configs(kernel: str) -> list[dict]:
    two, single = _pickable_tiles()
    if kernel == "single":
        tiles = [(cl, {"BLOCK": blk}, warps) for cl, blk, warps in single]
    elif kernel == "finalize":
        tiles = [(cl, {"BLOCK": gn.FINALIZE_BLOCK}, gn.FINALIZE_WARPS) for cl in (False, True)]
        tiles += tiles
    else:
        tiles = [(cl, {"BLOCK_C": bc, "BLOCK_S": bs}, gn.NUM_WARPS) for cl, bc, bs in two]
    # The JIT also specialises integer arguments equal to 1 into constants: batch 1, one
    # channel block (channels_last), one chunk, one tile per chunk, S == 1, Cg == 1.
    ones = {
        "single": [(False, 256, ("S", "Cg")), (True, 64, ("S", "Cg", "G"))],
        "stats": [(True, (128, 32), ("N", "cblocks")), (False, (1, 4096), ("N", "chunks"))],
        "finalize": [(True, None, ("N", "Cg")), (False, None, ("N", "chunks"))],
        "apply": [(True, (128, 32), ("N", "cblocks")), (False, (1, 4096), ("chunks",
                  "tiles_per_chunk"))],
    }[kernel]  # fmt: skip
    for cl, blk, names in ones:
        if kernel == "single":
            blocks, warps = {"BLOCK": blk}, 2
        elif kernel == "finalize":
            blocks, warps = {"BLOCK": gn.FINALIZE_BLOCK}, gn.FINALIZE_WARPS
        else:
            blocks, warps = {"BLOCK_C": blk[0], "BLOCK_S": blk[1]}, gn.NUM_WARPS
        tiles.append((cl, blocks, warps, names))
    out = []
    for i, (cl, blocks, warps, *ones_names) in enumerate(tiles):
        xd, wd, on, res_on, div16 = _VARIANTS[i % len(_VARIANTS)]
        types = {"x": f"*{xd}", "w": f"*{wd}", "fp32": "*fp32", "f": "fp32"}
        sig = {a: types[_ROLES[a]] if a in _ROLES else "i32" for a in _ARGS[kernel].split()}
        flags = {f: (on if j % 2 == 0 else not on) for j, f in enumerate(_FLAGS[kernel])}
        flags["HAS_RES"] = True if res_on else flags["HAS_RES"]
        ce = dict(blocks, CL=cl, **flags)
        divisible = [a for a in sig if sig[a].startswith("*")]
        if div16:
            divisible += [a for a in ("C", "S", "Cg") if a in sig]
        for name in ones_names[0] if ones_names else ():
            del sig[name]
            ce[name] = 1
        divisible = [a for a in divisible if a in sig]
        out.append({"signature": sig, "constexprs": ce, "num_warps": warps, "num_stages": 3,
                    "divisible_by_16": divisible})  # fmt: skip
    return out


def test_pickable_tiles_are_what_the_header_says():
    two, single = _pickable_tiles()
    assert {(bc, bs) for cl, bc, bs in two if not cl} == {
        (gn.TILE // bs, bs) for bs in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    }
    assert {bc for cl, bc, bs in two if cl} == {8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}
    assert {blk for _, blk, _ in single} == {1 << k for k in range(6, 15)}


def test_every_launch_configuration_compiles_for_sm80_and_sm90():
    kernels = ("single", "stats", "finalize", "apply")
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(aot_compile, "sdvae.kernels.group_norm", f"_gn_{k}_kernel", _configs(k))
            for k in kernels
        ]
        results = [f.result() for f in futures]
    for k, res in zip(kernels, results, strict=True):
        assert len(res) == 2 * len(_configs(k))
        assert sorted({r["cc"] for r in res}) == [80, 90]


# ------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_fused_inputs_at_a_vae_shape_on_gpu(dtype, layout):
    x = _input(1, 128, (256, 256), dtype, "cuda", layout, mean=3.0)
    r = _input(1, 128, (256, 256), dtype, "cuda", "nchw")
    w, b = _affine(128, dtype, "cuda")
    ib = _vec(128, dtype, "cuda")
    assert gn.describe_plan(x, 32).startswith("two_pass")
    y, s = K.group_norm(x, 32, w, b, EPS, silu=True, input_bias=ib, residual=r, return_sum=True)
    ref = _ref(x, 32, w, b, True, input_bias=ib, residual=r, return_sum=True)
    assert_close(y, ref[0], dtype, name="y")
    assert_close(s, ref[1], dtype, name="s")


@pytest.mark.cuda
@pytest.mark.serial
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_over_2_31_elements_on_gpu(layout):
    """2 x 64 x 4096^2 fp16 = 2^31 values (8 GiB for x and y): int64 bases."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.randn(2, 64, 4096, 4096, device="cuda", dtype=torch.float16).add_(1.0)
    x = _to_layout(x, layout)
    assert x.numel() >= 2**31
    y = K.group_norm(x, 32, None, None, EPS, silu=True)
    for i in range(2):  # per sample: an fp32 reference, plenty for fp16
        ref = torch.nn.functional.silu(
            torch.nn.functional.group_norm(x[i : i + 1].float(), 32, eps=EPS)
        )
        assert_close(y[i : i + 1], ref, torch.float16, name=f"sample {i}")


@pytest.mark.cuda
@pytest.mark.serial
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_last_groups_past_2_31_values_on_gpu(layout):
    """(1, 256, 4096, 4096) fp16, 32 groups (the first norm of the last decoder block at a
    4096^2 decode): the last 16 groups start 2^31 values or more into x. Every group against
    an fp32 reference of that group alone."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    c, groups = 256, 32
    cg = c // groups
    x = torch.randn(1, c, 4096, 4096, device="cuda", dtype=torch.float16).mul_(2.0).add_(1.0)
    x = _to_layout(x, layout)
    w, b = _affine(c, torch.float16, "cuda")
    assert (c - cg) * 4096 * 4096 >= 2**31 and gn.not_supported_reasons(x, groups, w, b) == []
    y = K.group_norm(x, groups, w, b, EPS, silu=True)
    for g in range(groups):
        sl = slice(g * cg, (g + 1) * cg)
        ref = torch.nn.functional.silu(
            torch.nn.functional.group_norm(x[:, sl].float(), 1, w[sl].float(), b[sl].float(), EPS)
        )
        assert_close(y[:, sl], ref, torch.float16, name=f"group {g}")


@pytest.mark.cuda
@pytest.mark.serial
@torch.no_grad()
def test_padding_slots_write_nothing_outside_y_on_gpu():
    """S = 2^31 - 4 * TILE - 1 pixels (the most the kernels take) in one group: the apply
    kernel's padding slots, whose pixel index passes 2^31, must write nothing. y sits 4 GiB
    into a zeroed buffer; the buffer before it stays zero, and y is the GroupNorm of x."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    s = 2**31 - 4 * gn.TILE - 1
    x = torch.randn(1, 1, s, device="cuda", dtype=torch.float16).add_(0.5)
    assert gn.not_supported_reasons(x, 1) == []
    buf = torch.zeros(_LEAD + s, dtype=torch.float16, device="cuda")
    y = buf[_LEAD:].view(1, 1, s)
    K.group_norm(x, 1, None, None, EPS, out=y)
    assert int(torch.count_nonzero(buf[:_LEAD])) == 0
    eighths = [slice(i * (s // 8), s if i == 7 else (i + 1) * (s // 8)) for i in range(8)]
    mean = sum(x[..., sl].double().sum() for sl in eighths) / s  # float64, in eighths
    var = sum((x[..., sl].double() - mean).square().sum() for sl in eighths) / s
    for i, sl in enumerate(eighths):
        ref = (x[..., sl].double() - mean) * (var + EPS).rsqrt()
        assert_close(y[..., sl], ref, torch.float16, name=f"y, eighth {i}")


# ------------------------------------------------------------------------- out= / in place
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_in_place_on_each_path(device, layout, path):
    """out=x overwrites x with y (what lets the model free its activations early); the
    result equals the float64 reference on both paths, with and without an input bias."""
    _device_or_skip(device)
    for ib in (False, True):
        x = _input(2, 12, (5, 7), torch.float32, device, layout)
        w, b = _affine(12, torch.float32, device)
        cb = _vec(12, torch.float32, device) if ib else None
        want = _ref(x, 3, w, b, True, input_bias=cb)
        ptr = x.data_ptr()
        y, _ = gn._launch(x, 3, w, b, EPS, True, cb, path=path, out=x)
        assert y.data_ptr() == ptr and y is x
        assert_close(x, want, torch.float32, name=f"in place {path} ib={ib}")


def test_out_public_function_and_reference_path(device):
    x = _input(1, 8, (4, 4), torch.float32, device, "nchw")
    w, b = _affine(8, torch.float32, device)
    want = _ref(x, 2, w, b, False)
    out = torch.empty_like(x)
    y = K.group_norm(x, 2, w, b, EPS, out=out)
    assert y is out
    assert_close(out, want, torch.float32)
    y = K.group_norm(x, 2, w, b, EPS, out=x)  # the reference path (no interpreter) too
    assert y is x
    assert_close(x, want, torch.float32)


def test_out_bad_arguments():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(TypeError, match="out"):
        K.group_norm(x, 2, out=[1])
    with pytest.raises(ValueError, match="out must match x"):
        K.group_norm(x, 2, out=torch.empty(1, 8, 4, 5))
    with pytest.raises(ValueError, match="out must be dense with x's strides"):
        K.group_norm(x, 2, out=torch.empty_like(x).to(memory_format=torch.channels_last))
    r = torch.randn_like(x)
    with pytest.raises(ValueError, match="out must not be the residual"):
        K.group_norm(x, 2, residual=r, out=r)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inference"):
        K.group_norm(xg, 2, out=torch.empty_like(x))
