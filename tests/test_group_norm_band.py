"""Band GroupNorm (``sdvae.kernels.group_norm_band``): partial statistics of a band and the
apply step with given statistics, against float64 references, on dense tensors and on row
slices (not dense when N > 1) in both layouts; Chan's merge; bad input; the torch.library
ops; the AOT compile of every kernel variant for sm_80 and sm_90."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import aot_compile, assert_close

gnb = importlib.import_module("sdvae.kernels.group_norm_band")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (N, C, H, W, groups, row slice): channels per group 1, 3 (not a power of two), 8; 1x1; a
# group long enough for several tiles and chunks under the interpreter; slices of N = 2
SHAPES = [
    (1, 4, 3, 5, 4, None),
    (2, 6, 5, 7, 2, (1, 4)),
    (1, 16, 9, 11, 2, (2, 9)),
    (2, 3, 1, 1, 1, None),
    (2, 8, 12, 13, 1, (3, 10)),
]
SHAPE_IDS = ["cg1", "cg3-slice", "cg8-slice", "1x1", "long-slice"]


def _band(shape, dtype, device, layout, mean=3.0):
    n, c, h, w, _, rows = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(n, c, h, w) * 1.5 + mean).to(device, dtype).contiguous(memory_format=fmt)
    return x if rows is None else x[:, :, rows[0] : rows[1]]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_stats(shape, dtype, layout, device):
    x = _band(shape, dtype, device, layout)
    g = shape[4]
    mean, m2, count = gnb.group_norm_band_stats(x, g)
    rm, rm2, rcount = gnb.group_norm_band_stats_reference(x.double(), g)
    assert count == rcount == (shape[1] // g) * x.shape[2] * x.shape[3]
    assert mean.dtype == torch.float32 and mean.shape == (shape[0], g)
    assert_close(mean, rm, torch.float32, name="mean")
    assert_close(m2, rm2, torch.float32, name="m2")


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_apply(shape, dtype, layout, silu, device):
    x = _band(shape, dtype, device, layout)
    n, c, g = shape[0], shape[1], shape[4]
    mean = torch.randn(n, g, device=device) + 3.0
    rstd = torch.rand(n, g, device=device) + 0.5
    w = torch.randn(c, device=device).to(dtype)
    b = torch.randn(c, device=device).to(dtype)
    y = gnb.group_norm_band_apply(x, mean, rstd, w, b, silu=silu)
    ref = gnb.group_norm_band_apply_reference(x.double(), mean.double(), rstd.double(),
                                              w.double(), b.double(), silu=silu)  # fmt: skip
    assert y.dtype == dtype and y.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_apply_equals_group_norm_with_the_bands_own_statistics(layout, device):
    x = _band((2, 12, 9, 10, 3, (2, 8)), torch.float32, device, layout)
    mean, m2, count = gnb.group_norm_band_stats(x, 3)
    rstd = torch.rsqrt(m2 / count + 1e-6)
    w, b = torch.randn(12, device=device), torch.randn(12, device=device)
    y = gnb.group_norm_band_apply(x, mean, rstd, w, b, silu=True)
    ref = F.silu(F.group_norm(x.double(), 3, w.double(), b.double(), 1e-6))
    assert_close(y, ref, torch.float32)


def test_apply_out_and_in_place(device):
    x = _band((1, 8, 6, 7, 2, None), torch.float32, device, "nchw")
    mean, rstd = torch.randn(1, 2, device=device), torch.rand(1, 2, device=device) + 0.5
    ref = gnb.group_norm_band_apply_reference(x.double(), mean.double(), rstd.double(), silu=True)
    out = torch.empty_like(x)
    assert gnb.group_norm_band_apply(x, mean, rstd, silu=True, out=out) is out
    assert_close(out, ref, torch.float32)
    y = gnb.group_norm_band_apply(x, mean, rstd, silu=True, out=x)
    assert y is x
    assert_close(x, ref, torch.float32)


def test_merge_is_chans_formula_not_an_average_of_variances():
    # Two bands with far apart means: their pooled variance is mostly the spread of the means.
    a = torch.randn(1, 4, 3, 5, dtype=torch.float64) + 10.0
    b = torch.randn(1, 4, 6, 5, dtype=torch.float64) - 10.0
    whole = torch.cat([a, b], dim=2)
    mean, m2, count = gnb.merge_stats(
        *gnb.group_norm_band_stats_reference(a, 2), *gnb.group_norm_band_stats_reference(b, 2)
    )
    rm, rm2, rcount = gnb.group_norm_band_stats_reference(whole, 2)
    assert count == rcount
    torch.testing.assert_close(mean, rm, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(m2, rm2, rtol=1e-13, atol=1e-10)
    var_avg = (
        gnb.group_norm_band_stats_reference(a, 2)[1] / (2 * 15)
        + gnb.group_norm_band_stats_reference(b, 2)[1] / (2 * 30)
    ) / 2
    assert (rm2 / rcount > 50 * var_avg).all()  # what an average of variances would miss


def test_not_supported_reasons(monkeypatch):
    x = torch.randn(1, 4, 2, 2)
    assert "float64" in " ".join(gnb.not_supported_reasons(x.double(), 2))
    # the (N, C, 2) scratch of (mean, rstd) is indexed in int32: 2 * N * C must stay below 2^31
    assert gnb.not_supported_reasons(torch.empty(2**14, 2**16 - 1, 1, 1, device="meta"), 1) == [
        r for r in gnb.not_supported_reasons(torch.empty(1, 1, 1, 1, device="meta"), 1)
    ]
    big = gnb.not_supported_reasons(torch.empty(2**14, 2**16, 1, 1, device="meta"), 1)
    assert any("2 * N * C >= 2^31" in r for r in big)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("eager reference" in r for r in gnb.not_supported_reasons(x, 2))
    # and then the reference runs, with the same results
    mean, m2, count = gnb.group_norm_band_stats(x, 2)
    rm, rm2, _ = gnb.group_norm_band_stats_reference(x, 2)
    assert torch.equal(mean, rm) and torch.equal(m2, rm2)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, m: gnb.group_norm_band_stats(x[0], 2), ValueError, "4-D"),
        (lambda x, m: gnb.group_norm_band_stats(x, 3), ValueError, "num_groups=3"),
        (lambda x, m: gnb.group_norm_band_stats(x, 2.0), TypeError, "num_groups must be"),
        (lambda x, m: gnb.group_norm_band_stats(x.int(), 2), TypeError, "floating-point"),
        (lambda x, m: gnb.group_norm_band_stats([1], 2), TypeError, "x must be a torch.Tensor"),
        (
            lambda x, m: gnb.group_norm_band_apply(x, m[:, :1].expand(2, 3), m),
            ValueError,
            "mean must be",
        ),
        (lambda x, m: gnb.group_norm_band_apply(x, m, m[:1]), ValueError, "rstd must be"),
        (
            lambda x, m: gnb.group_norm_band_apply(x, m, m, torch.ones(3)),
            ValueError,
            r"weight must have shape \(4,\)",
        ),
        (
            lambda x, m: gnb.group_norm_band_apply(x, m, m, out=x[:, :2]),
            ValueError,
            "out must match x",
        ),
    ],
)
def test_bad_input(call, exc, match):
    x = torch.randn(2, 4, 3, 3)
    m = torch.randn(2, 2)
    with pytest.raises(exc, match=match):
        call(x, m)


def test_library_ops_match_the_functions():
    x = _band((2, 6, 5, 7, 2, (1, 4)), torch.float32, "cpu", "nchw")
    mean, m2 = torch.ops.sdvae.group_norm_band_stats(x, 2)
    rm, rm2, _ = gnb.group_norm_band_stats(x, 2)
    assert torch.equal(mean, rm) and torch.equal(m2, rm2)
    rstd = torch.rsqrt(m2 + 1.0)
    y = torch.ops.sdvae.group_norm_band_apply(x, mean, rstd, None, None, True)
    assert torch.equal(y, gnb.group_norm_band_apply(x, mean, rstd, silu=True))
    with torch._subclasses.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fm = mode.from_tensor(mean)
        fake = torch.ops.sdvae.group_norm_band_apply(fx, fm, fm, None, None, False)
        fmean, _ = torch.ops.sdvae.group_norm_band_stats(fx, 2)
    assert fake.shape == x.shape and fmean.shape == (2, 2)


# ------------------------------------------------------------------- ahead of time
_STATS_ARGS = "x_ptr mean_ptr m2_ptr H W Cg G sxn sxc sxh sxw L per_chunk CHUNKS"
_APPLY_ARGS = "x_ptr y_ptr coef_ptr b_ptr C H W sxn sxc sxh sxw syn syc syh syw INNER TILES"
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _configs(kernel: str) -> list[dict]:
    out = []
    for dtype in DTYPES:
        t = _TYPES[dtype]
        for c_fast in (False, True):
            for wide in (False, True):  # strides of tensors past 2^31 values: i64
                stride = "i64" if wide else "i32"
                if kernel == "stats":
                    sig = {a: "i32" for a in _STATS_ARGS.split()}
                    sig.update(x_ptr=f"*{t}", mean_ptr="*fp32", m2_ptr="*fp32")
                    sig.update({a: stride for a in ("sxn", "sxc", "sxh", "sxw")})
                    ce = dict(BLOCK=gnb.STATS_BLOCK, C_FAST=c_fast)
                    out.append({"signature": sig, "constexprs": ce, "num_warps": gnb.NUM_WARPS})
                    continue
                for has_b, silu in ((True, True), (False, False), (True, False)):
                    sig = {a: "i32" for a in _APPLY_ARGS.split()}
                    sig.update(x_ptr=f"*{t}", y_ptr=f"*{t}", coef_ptr="*fp32", b_ptr=f"*{t}")
                    sig.update({a: stride for a in ("sxn", "sxc", "sxh", "sxw", "syn", "syc",
                                                     "syh", "syw")})  # fmt: skip
                    ce = dict(BLOCK=gnb.APPLY_BLOCK, C_FAST=c_fast, HAS_B=has_b, SILU=silu)
                    out.append({"signature": sig, "constexprs": ce, "num_warps": 4})
    return out


@pytest.mark.parametrize("kernel", ["stats", "apply"])
def test_every_variant_compiles_for_sm80_and_sm90(kernel):
    configs = _configs(kernel)
    results = aot_compile("sdvae.kernels.group_norm_band", f"_gnb_{kernel}_kernel", configs)
    assert len(results) == 2 * len(configs)


# ------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_vae_band_on_gpu(dtype, layout):
    """A 64-row band of a 128-channel 1024-wide activation (one band of a 4096^2 decode's last
    level at a quarter of its width)."""
    x = _band((1, 128, 96, 1024, 32, (16, 80)), dtype, "cuda", layout)
    mean, m2, count = gnb.group_norm_band_stats(x, 32)
    rm, rm2, _ = gnb.group_norm_band_stats_reference(x.double(), 32)
    assert_close(mean, rm, torch.float32)
    assert_close(m2, rm2, torch.float32)
    rstd = torch.rsqrt(m2 / count + 1e-6)
    w, b = (
        torch.randn(128, device="cuda", dtype=dtype),
        torch.randn(128, device="cuda", dtype=dtype),
    )
    y = gnb.group_norm_band_apply(x, mean, rstd, w, b, silu=True)
    ref = gnb.group_norm_band_apply_reference(x.double(), mean.double(), rstd.double(),
                                              w.double(), b.double(), silu=True)  # fmt: skip
    assert_close(y, ref, dtype)
