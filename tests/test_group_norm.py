"""GroupNorm (+ SiLU): the Triton kernels against a float64 reference, the launcher's strategy
choice, bad input, dispatch, the torch.library op, the bench suite and the AOT compile of every
configuration the launcher can pick."""

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

# (N, C, spatial, groups): channels per group 2, 3, 16, 1, 3 (1x1 spatial), 3 (1 spatial dim),
# 4 (3 spatial dims), 40 (two channel blocks of 32); H*W never a power of two but for 1x1.
SHAPES = [
    (2, 8, (5, 7), 4),
    (1, 6, (3, 5), 2),
    (1, 32, (3, 5), 2),
    (1, 4, (2, 3), 4),
    (2, 6, (1, 1), 2),
    (1, 12, (9,), 4),
    (1, 16, (3, 2, 5), 4),
    (1, 80, (3, 3), 2),
]
SHAPE_IDS = ["cg2", "cg3", "cg16", "cg1", "1x1", "1d", "3d", "cg40"]


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


def _affine(c, dtype, device):
    w = (1 + 0.5 * torch.randn(c, dtype=torch.float64)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(c, dtype=torch.float64)).to(device=device, dtype=dtype)
    return w, b


def _ref(x, groups, w, b, silu, eps=EPS):
    d = torch.float64
    return gn.group_norm_reference(
        x.to(d), groups, None if w is None else w.to(d), None if b is None else b.to(d), eps,
        silu=silu,
    )  # fmt: skip


def _check_layout(y, x):
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.stride() == x.stride(), f"strides {y.stride()} != input's {x.stride()}"


# ------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_float64_reference(device, shape, dtype, layout, silu=True):
    _device_or_skip(device)
    n, c, spatial, groups = shape
    x = _input(n, c, spatial, dtype, device, layout)
    w, b = _affine(c, dtype, device)
    assert gn.not_supported_reasons(x, groups, w, b, EPS, silu=silu) == []
    y = K.group_norm(x, groups, w, b, EPS, silu=silu)
    _check_layout(y, x)
    assert_close(y, _ref(x, groups, w, b, silu), dtype, name=f"group_norm {shape}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[6]], ids=["cg3", "3d"])
def test_without_silu(device, shape, layout):
    test_matches_float64_reference(device, shape, torch.float32, layout, silu=False)


# (N, C, spatial, groups, split), forced through the two-kernel path with small tiles (64 values
# for NCHW, the interpreter's 256 for channels_last) so that tiny shapes still take several
# tiles per chunk and an uneven last chunk.
SPLIT_CASES = [
    (1, 12, (10, 10), 4, 3),
    (2, 6, (7, 9), 2, 4),
    (1, 8, (6, 7), 4, 2),
    (1, 80, (3, 5), 2, 2),
    (1, 16, (4, 6, 3), 4, 5),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"split{i}" for i in range(len(SPLIT_CASES))])
def test_split_path_matches_reference(device, case, dtype, layout):
    _device_or_skip(device)
    n, c, spatial, groups, split = case
    tile = 64 if layout == "nchw" else gn.INTERPRET_TILE
    x = _input(n, c, spatial, dtype, device, layout)
    w, b = _affine(c, dtype, device)
    plan = gn._plan(n, c, x[0, 0].numel(), groups, layout == "channels_last", 4, tile, split)
    assert plan.strategy == "split" and plan.split > 1
    y = gn._launch(x, groups, w, b, EPS, True, tile=tile, split=split)
    _check_layout(y, x)
    assert_close(y, _ref(x, groups, w, b, True), dtype, name=f"split {case}")


@pytest.mark.parametrize("forced", [None, (32, 3)], ids=["fused", "split"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_fp32_keeps_full_precision(device, layout, forced):
    """mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 loses every digit; we must stay at 1e-5."""
    _device_or_skip(device)
    x = _input(1, 16, (6, 6), torch.float32, device, layout, mean=1e4, std=1.0)
    w, b = _affine(16, torch.float32, device)
    if forced is None:
        y = K.group_norm(x, 8, w, b, EPS, silu=False)
    else:
        y = gn._launch(x, 8, w, b, EPS, False, tile=forced[0], split=forced[1])
    ref = _ref(x, 8, w, b, False)
    assert_close(y, ref, torch.float32, name="large mean")
    # The test can tell: the naive one-pass variance in fp32 is far off.
    xg = x.contiguous().reshape(1, 8, -1)
    naive = (xg * xg).mean(-1) - xg.mean(-1) ** 2
    true = xg.double().var(-1, unbiased=False)
    assert ((naive.double() - true).abs() / true).max() > 1e-2


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
    assert gn._layout(x) is None
    w, b = _affine(8, torch.float32, device)
    y = K.group_norm(x, 4, w, b, EPS, silu=True)
    assert y.is_contiguous()
    assert_close(y, _ref(x, 4, w, b, True), torch.float32)


def test_eps_is_used(device):
    _device_or_skip(device)
    x = _input(1, 4, (3, 3), torch.float32, device, "nchw", std=0.05)
    y = K.group_norm(x, 2, eps=0.01)
    assert_close(y, _ref(x, 2, None, None, False, eps=0.01), torch.float32)


def test_empty_batch(device):
    _device_or_skip(device)
    x = torch.randn(0, 8, 3, 3, device=device)
    assert K.group_norm(x, 4).shape == (0, 8, 3, 3)


# -------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(512, 64), (512, 128), (256, 512), (128, 1024)])
def test_plan_fills_an_h100_at_vae_shapes(shape, layout):
    c, hw = shape
    plan = gn._plan(1, c, hw * hw, 32, layout == "channels_last", 132)
    assert plan.strategy == "split"
    assert plan.num_gblocks * plan.split >= 132, plan
    assert (plan.split - 1) * plan.chunk_s < hw * hw <= plan.split * plan.chunk_s  # no empty chunk
    assert plan.block_s * plan.block_g * plan.block_cg == gn.TILE


def test_plan_fuses_when_groups_fill_the_gpu_or_fit_one_tile():
    assert gn._plan(64, 512, 64 * 64, 32, False, 132).strategy == "fused"
    assert gn._plan(1, 64, 8 * 8, 32, True, 132).strategy == "fused"
    assert gn._plan(1, 64, 8 * 8, 32, False, 132).strategy == "fused"


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
    ],
    ids=[
        "indivisible", "zero-groups", "float-groups", "weight-size", "bias-size", "rank2",
        "rank6", "numpy", "int", "weight-device", "bias-device", "weight-dtype", "eps",
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(exc, match=match):
        call(x)


@pytest.mark.cuda
def test_mixed_cuda_cpu_devices_raise():
    x = torch.randn(1, 8, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        K.group_norm(x, 4, torch.ones(8))


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
    reasons = gn.not_supported_reasons(x, 4)
    assert any("TRITON_INTERPRET" in r for r in reasons)
    y = K.group_norm(x, 4, silu=True)
    assert torch.equal(y, gn.group_norm_reference(x, 4, silu=True))


def test_float64_runs_reference_and_says_why():
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    assert any("float64" in r for r in gn.not_supported_reasons(x, 4))
    assert torch.equal(K.group_norm(x, 4), gn.group_norm_reference(x, 4))


def test_inputs_requiring_grad_run_the_differentiable_reference():
    x = _input(1, 8, (3, 3), torch.float32, "cpu", "nchw").requires_grad_()
    w, b = _affine(8, torch.float32, "cpu")
    w.requires_grad_()
    assert any("grad" in r for r in gn.not_supported_reasons(x, 4, w, b))
    K.group_norm(x, 4, w, b, silu=True).square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gn.group_norm_reference(x2, 4, w2, b, silu=True).square().sum().backward()
    assert_close(x.grad, x2.grad.double(), torch.float32, name="x.grad")
    assert_close(w.grad, w2.grad.double(), torch.float32, name="weight.grad")


# ------------------------------------------------------------------- torch.library op
def test_torch_library_op_matches_and_backpropagates(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 5), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device)
    y = torch.ops.sdvae.group_norm(x, 4, w, b, EPS, True)
    _check_layout(y, x)
    assert_close(y, _ref(x, 4, w, b, True), torch.float32)
    xr = x.detach().clone().requires_grad_()
    torch.ops.sdvae.group_norm(xr, 4, w, None, EPS, True).sum().backward()
    xr2 = x.detach().clone().requires_grad_()
    gn.group_norm_reference(xr2, 4, w, None, EPS, silu=True).sum().backward()
    assert_close(xr.grad, xr2.grad.double(), torch.float32, name="x.grad")


def test_opcheck(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 3), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device)
    for args in [(x, 4, w, b, EPS, True), (x.contiguous(), 2, None, None, 1e-5, False)]:
        torch.library.opcheck(torch.ops.sdvae.group_norm.default, args)


def test_compiles_without_graph_break(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 3), torch.float32, device, "nchw")

    def f(t):
        return K.group_norm(t * 2, 4, silu=True) + 1

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert_close(out, _ref(x * 2, 4, None, None, True) + 1, torch.float32)


# ------------------------------------------------------------------------- the bench
def test_bench_suite_runs_on_cpu():
    if not INTERPRET:
        pytest.skip("the CPU bench rows need TRITON_INTERPRET=1")
    from sdvae.bench import engine

    rows = engine.run(
        engine.Context(device=torch.device("cpu"), quick=True), ["group_norm_silu"], rep_ms=1
    )
    got = {(r.layout, r.provider) for r in rows}
    assert got == {(lo, p) for lo in ("nchw", "channels_last") for p in ("eager", "sdvae")}
    assert all(r.bench == "group_norm_silu" and r.dtype == "fp32" for r in rows)
    assert all(r.median_ms > 0 and r.gbps > 0 for r in rows)


def test_bench_shapes_are_the_design_shapes():
    from sdvae.bench import cases_group_norm as cases

    want = {(512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512)}
    want |= {(c, 2 * hw) for c, hw in want}
    assert set(cases.SHAPES) == want and len(cases.SHAPES) == len(want)


# ---------------------------------------------------------------------- AOT compile
def _signature(kernel: str, x: str, w: str) -> dict:
    sig = {"x_ptr": f"*{x}"}
    if kernel == "stats":
        sig["part_ptr"] = "*fp32"
    else:
        sig.update(y_ptr=f"*{x}", w_ptr=f"*{w}", b_ptr=f"*{w}")
        if kernel == "apply":
            sig["part_ptr"] = "*fp32"
    sig.update(S="i32", C="i32", Cg="i32", G="i32", num_gblocks="i32")
    if kernel != "fused":
        sig.update(split="i32", chunk_s="i32")
    if kernel != "stats":
        sig["eps"] = "fp32"
    return sig


def _configs(kernel: str) -> list[dict]:
    """Every tile the launcher can pick: it depends only on the layout, on Cg rounded up to a
    power of two and capped at 32 (the tile), and on whether Cg equals that (CG_EXACT). The
    exact ones in fp16 with fp32 affine, the inexact ones in the other dtype pairings and
    flag sets; then the specialisation the JIT makes for S == 1 and Cg == 1 (with CG_EXACT a
    Cg of 1 is already the constant BLOCK_CG)."""
    picks = {
        (cl, gn.tile_shape(cl, cg), cg == gn.tile_shape(cl, cg)[2])
        for cl in (False, True)
        for cg in range(1, 2 * gn.MAX_BLOCK_CG + 1)
    }
    assert len(picks) == 20
    variants = [("fp32", "fp32", (False, True, False)), ("bf16", "bf16", (True, False, True))]
    out = []

    def add(cl, tile, exact, x, w, flags=(True, True, True), consts=None):
        bs, bg, bcg = tile
        ce = dict(BLOCK_S=bs, BLOCK_G=bg, BLOCK_CG=bcg, CHANNELS_LAST=cl, CG_EXACT=exact)
        if kernel != "stats":
            ce.update(HAS_W=flags[0], HAS_B=flags[1], SILU=flags[2])
        if kernel == "apply":
            ce["MERGE"] = gn.MERGE_BLOCK
        sig = _signature(kernel, x, w)
        for name, value in (consts or {}).items():
            del sig[name]
            ce[name] = value
        out.append({"signature": sig, "constexprs": ce, "num_warps": gn.NUM_WARPS, "num_stages": 3})

    for i, (cl, tile, exact) in enumerate(sorted(picks)):
        if exact:
            add(cl, tile, exact, "fp16", "fp32")
        else:
            add(cl, tile, exact, *variants[i % 2])
    if kernel == "fused":  # S == 1 always plans "fused" (one tile per group)
        add(False, gn.tile_shape(False, 1), True, "bf16", "fp32", consts={"S": 1, "Cg": 1})
        add(True, gn.tile_shape(True, 1), True, "fp32", "fp32", consts={"S": 1, "Cg": 1})
    return out


def test_every_launcher_configuration_compiles_for_sm80_and_sm90():
    kernels = ("fused", "stats", "apply")
    with ThreadPoolExecutor(len(kernels)) as pool:
        futures = [
            pool.submit(aot_compile, "sdvae.kernels.group_norm", f"_gn_{k}_kernel", _configs(k))
            for k in kernels
        ]
        results = [f.result() for f in futures]
    for k, res in zip(kernels, results, strict=True):
        assert len(res) == 2 * len(_configs(k))
        assert sorted({r["cc"] for r in res}) == [80, 90]
