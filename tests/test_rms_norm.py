"""Channel RMS norm (+ SiLU) of the Wan VAE: the Triton kernel against a float64 reference in
both layouts, 4-D and 5-D, on the one-block and channel-loop paths; equality with diffusers'
``WanRMS_norm``; out= / in place; bad input; dispatch (CPU, grad mode); the torch.library op;
the launch rule and the AOT compile of its configurations for sm_80 and sm_90."""

from __future__ import annotations

import copy
import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import aot_compile, assert_close

from sdvae import kernels as K

# The module itself: ``from sdvae.kernels import rms_norm`` is the op function.
rn = importlib.import_module("sdvae.kernels.rms_norm")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
LAYOUTS = ["contiguous", "channels_last"]
F64_TOL = 1e-10

# (N, C, spatial): odd channel counts and pixel counts. Under the interpreter one channel
# block is 16 channels: 12 and 3 fit one block (3 and 1x1 spatial: the S == 1 path), 16 fills
# it exactly, 17 and 40 take the channel loop (the last block holding 1 and 8 channels).
SHAPES = [
    (2, 12, (5, 7)),
    (1, 40, (3, 5, 7)),
    (2, 6, (9,)),
    (1, 3, (1, 1)),
    (3, 16, (2, 3, 5)),
    (1, 17, (4, 5)),
]
SHAPE_IDS = ["4d-c12", "5d-c40-loop", "3d-c6", "1x1-c3", "5d-c16", "4d-c17-loop"]


def _device_or_skip(device: str) -> None:
    if device == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors run the eager reference unless TRITON_INTERPRET=1")


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    return x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels innermost, any rank


def _input(n, c, spatial, dtype, device, layout, *, mean=0.5, std=2.0):
    """Random input with a non-zero mean (fresh per call)."""
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * std + mean
    return _to_layout(x.to(device=device, dtype=dtype), layout)


def _affine(c, dtype, device, shape=None):
    """gamma ~ N(1, 0.5^2) in ``shape`` (default (C,)), bias ~ N(0, 0.5^2) as (C,)."""
    g = 1.0 + 0.5 * torch.randn(c, dtype=torch.float64)
    b = 0.5 * torch.randn(c, dtype=torch.float64)
    g = g.reshape(shape) if shape is not None else g
    return g.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _d(t):
    return None if t is None or not isinstance(t, torch.Tensor) else t.to(torch.float64)


def _ref(x, w, b, silu, eps=1e-12):
    return rn.rms_norm_reference(_d(x), _d(w), _d(b), eps=eps, silu=silu)


def _close(y, ref, dtype, name="rms_norm"):
    tol = F64_TOL if dtype == torch.float64 else None
    return assert_close(y, ref, dtype, tol=tol, name=name)


def _check_layout(y, x):
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.stride() == x.stride(), f"strides {y.stride()} != input's {x.stride()}"


# ------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_float64_reference(device, shape, dtype, layout):
    _device_or_skip(device)
    n, c, spatial = shape
    x = _input(n, c, spatial, dtype, device, layout)
    w, b = _affine(c, dtype, device)
    assert rn.not_supported_reasons(x, w, b, silu=True) == []
    y = K.rms_norm(x, w, b, silu=True)
    _check_layout(y, x)
    _close(y, _ref(x, w, b, True), dtype, name=f"rms_norm {shape}")


def test_shapes_cover_both_paths_under_the_interpreter():
    picked = {rn.plan(c, cl, 4, interpret=True).one_block for _, c, _ in SHAPES for cl in (0, 1)}
    assert picked == {True, False}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("silu", [False, True], ids=["nosilu", "silu"])
@pytest.mark.parametrize("bias", ["none", "zero", "tensor", "fp32"])
def test_bias_and_silu_options(device, bias, silu, layout):
    """bias None, diffusers' 0.0, a tensor in x's dtype, fp32 gamma/bias beside fp16 x."""
    _device_or_skip(device)
    dtype = torch.float16 if bias == "fp32" else torch.float32
    x = _input(2, 40, (3, 5), dtype, device, layout, mean=-0.7)
    w, b = _affine(40, torch.float32 if bias == "fp32" else dtype, device)
    b = {"none": None, "zero": 0.0}.get(bias, b)
    y = K.rms_norm(x, w, b, silu=silu)
    _check_layout(y, x)
    _close(y, _ref(x, w, b, silu), dtype, name=f"bias={bias} silu={silu}")
    if bias == "zero":
        assert torch.equal(y, K.rms_norm(x, w, None, silu=silu))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [12, 40], ids=["one_block", "loop"])
def test_input_bias_is_added_in_the_loads(device, c, dtype, layout):
    """``input_bias`` (a producing conv's bias): the norm of ``x + input_bias[c]``, against
    float64 (the sum unrounded, in the kernel's accumulation type); written in place too."""
    _device_or_skip(device)
    x = _input(1, c, (3, 4, 5), dtype, device, layout)
    w, b = _affine(c, dtype, device)
    ib = (torch.randn(c, dtype=torch.float64) * 2).to(device, dtype)
    assert rn.not_supported_reasons(x, w, b, silu=True, input_bias=ib) == []
    want = rn.rms_norm_reference(_d(x), _d(w), _d(b), silu=True, input_bias=_d(ib))
    y = K.rms_norm(x, w, b, silu=True, input_bias=ib)
    _check_layout(y, x)
    _close(y, want, dtype, name=f"input_bias c={c}")
    assert (y.double() - _ref(x, w, b, True)).abs().max() > 0.1, "input_bias ignored"
    assert K.rms_norm(x, w, b, silu=True, input_bias=ib, out=x) is x
    assert torch.equal(x, y)


def test_strided_channel_vectors_are_read_as_their_values(device):
    """gamma, bias and input bias given as strided (C,) views (every other element of a
    longer vector): the kernel reads their values, not the memory after the first."""
    _device_or_skip(device)
    x = _input(2, 12, (3, 5), torch.float32, device, "contiguous")
    w2, b2 = _affine(24, torch.float32, device)
    w, b, ib = w2[::2], b2[::2], b2.flip(0)[::2]
    assert not w.is_contiguous() and not ib.is_contiguous()
    want = rn.rms_norm_reference(_d(x), _d(w), _d(b), silu=True, input_bias=_d(ib))
    _close(K.rms_norm(x, w, b, silu=True, input_bias=ib), want, torch.float32)


def test_input_bias_is_checked_and_differentiable():
    x = _input(1, 6, (2, 3), torch.float64, "cpu", "contiguous")
    w, b = _affine(6, torch.float64, "cpu")
    with pytest.raises(ValueError, match="input_bias must have 6 elements"):
        K.rms_norm(x, w, input_bias=torch.zeros(5, dtype=torch.float64))
    ib = torch.randn(6, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    K.rms_norm(xr, w, b, silu=True, input_bias=ib).square().sum().backward()
    x2, ib2 = (t.detach().clone().requires_grad_() for t in (x, ib))
    z = x2 + ib2.view(1, -1, 1, 1)
    rn.rms_norm_reference(z, w, b, silu=True).square().sum().backward()
    assert (ib.grad - ib2.grad).abs().max() < 1e-12 and (xr.grad - x2.grad).abs().max() < 1e-12
    ib3 = ib.detach().clone().requires_grad_()
    torch.ops.sdvae.rms_norm(x, w, b, 1e-12, True, ib3).square().sum().backward()
    assert (ib3.grad - ib2.grad).abs().max() < 1e-12


@pytest.mark.parametrize(
    "fmt, rank", [(torch.channels_last, 4), (torch.channels_last_3d, 5)], ids=["cl", "cl3d"]
)
def test_torch_memory_formats_are_kept(device, fmt, rank):
    """Tensors made by torch's own channels_last / channels_last_3d conversion, and the
    plain contiguous ones, come back in the same format (and need no copy)."""
    _device_or_skip(device)
    spatial = (3, 5) if rank == 4 else (2, 3, 5)
    x = torch.randn(2, 12, *spatial, device=device) + 0.3
    w, b = _affine(12, torch.float32, device)
    for t in (x, x.to(memory_format=fmt)):
        y = K.rms_norm(t, w, b)
        _check_layout(y, t)
        assert y.is_contiguous(memory_format=fmt) == t.is_contiguous(memory_format=fmt)
        _close(y, _ref(t, w, b, False), torch.float32)


def test_other_strides_are_made_contiguous(device):
    _device_or_skip(device)
    base = torch.randn(2, 8, 6, 10, device=device) + 1.0
    x = base[:, :, :, ::2]  # neither contiguous nor channels-last
    assert rn._layout(x) is None
    w, b = _affine(8, torch.float32, device)
    y = K.rms_norm(x, w, b, silu=True)
    assert y.is_contiguous()
    _close(y, _ref(x, w, b, True), torch.float32)
    out = torch.empty(x.shape, device=device)
    assert K.rms_norm(x, w, b, silu=True, out=out) is out
    _close(out, _ref(x, w, b, True), torch.float32)


def test_eps_zero_pixel_and_nan(device):
    """An all-zero pixel gives the bias (the norm is clamped to eps); a larger eps is used; a
    NaN in one channel makes its whole pixel NaN, as F.normalize does."""
    _device_or_skip(device)
    x = _input(1, 6, (2, 3), torch.float32, device, "channels_last")
    x[0, :, 1, 2] = 0.0
    w, b = _affine(6, torch.float32, device)
    y = K.rms_norm(x, w, b)
    assert torch.equal(y[0, :, 1, 2], b)
    _close(y, _ref(x, w, b, False), torch.float32)
    small = x * 1e-3
    _close(K.rms_norm(small, w, b, eps=0.1), _ref(small, w, b, False, eps=0.1), torch.float32)
    x[0, 2, 0, 1] = float("nan")
    y = K.rms_norm(x, w, b)
    assert torch.isnan(y[0, :, 0, 1]).all()
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[0, :, 0, 1] = False
    assert torch.isfinite(y[keep]).all()


def test_empty_batch(device):
    _device_or_skip(device)
    x = torch.randn(0, 8, 3, 3, device=device)
    assert K.rms_norm(x, torch.ones(8, device=device)).shape == (0, 8, 3, 3)


# ------------------------------------------------------------------------- diffusers
def _wan_module(c, images, bias):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    m = WanRMS_norm(c, images=images, bias=bias)
    with torch.no_grad():
        m.gamma.copy_(1.0 + 0.5 * torch.randn_like(m.gamma))
        if bias:
            m.bias.copy_(0.5 * torch.randn_like(m.bias))
    return m


@pytest.mark.parametrize(
    "images, bias, layout",
    [
        (True, False, "contiguous"),
        (True, True, "channels_last"),
        (False, True, "contiguous"),
        (False, False, "channels_last"),
    ],
    ids=["images-nobias-contiguous", "images-bias-cl", "video-bias-contiguous", "video-nobias-cl"],
)
def test_matches_diffusers_wan_rms_norm(device, images, bias, layout):
    """diffusers' module: gamma (C, 1, 1) on 4-D input (images=True) and (C, 1, 1, 1) on 5-D
    (images=False); bias a parameter or the float 0.0. The reference is diffusers' own
    computation, bit for bit; the kernel matches the module at float64 to 1e-10, and in
    fp32/fp16/bf16 within the tolerance table (one 16-channel block and the loop: C = 24)."""
    _device_or_skip(device)
    c = 24
    spatial = (5, 7) if images else (3, 4, 5)
    m = _wan_module(c, images, bias).to(device)
    assert m.gamma.shape == ((c, 1, 1) if images else (c, 1, 1, 1))
    for dtype in (torch.float32, torch.float16):  # the reference is diffusers, exactly
        x = _input(2, c, spatial, dtype, device, layout)
        mt = copy.deepcopy(m).to(dtype)
        with torch.no_grad():
            assert torch.equal(rn.rms_norm_reference(x, mt.gamma, mt.bias), mt(x))
    m64 = copy.deepcopy(m).to(torch.float64)
    for dtype in DTYPES:
        x = _input(2, c, spatial, dtype, device, layout)
        gamma = m64.gamma.to(dtype)
        b = m64.bias.to(dtype) if bias else m64.bias  # the float 0.0 when there is no bias
        with torch.no_grad():  # gamma is a parameter: with grad on, the reference would run
            assert rn.not_supported_reasons(x, gamma, b) == []
            want = m64(x.to(torch.float64))
            y = K.rms_norm(x, gamma, b)
        _check_layout(y, x)
        _close(y, want, dtype, name=f"vs WanRMS_norm ({dtype})")


# ------------------------------------------------------------------------- out= / in place
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [12, 40], ids=["one_block", "loop"])
def test_out_in_place(device, c, layout):
    """out=x overwrites x with y; the result equals the float64 reference on both paths."""
    _device_or_skip(device)
    x = _input(2, c, (3, 5), torch.float32, device, layout)
    w, b = _affine(c, torch.float32, device)
    want = _ref(x, w, b, True)
    ptr = x.data_ptr()
    y = K.rms_norm(x, w, b, silu=True, out=x)
    assert y is x and x.data_ptr() == ptr
    _close(x, want, torch.float32, name="in place")


def test_out_other_tensor(device):
    _device_or_skip(device)
    x = _input(1, 8, (2, 4, 4), torch.float16, device, "channels_last")
    w, b = _affine(8, torch.float16, device)
    out = torch.empty_like(x)
    assert K.rms_norm(x, w, b, out=out) is out
    _close(out, _ref(x, w, b, False), torch.float16)


def test_out_bad_arguments():
    x = torch.randn(1, 8, 4, 4)
    w = torch.ones(8)
    with pytest.raises(TypeError, match="out"):
        K.rms_norm(x, w, out=[1])
    with pytest.raises(ValueError, match="out must match x"):
        K.rms_norm(x, w, out=torch.empty(1, 8, 4, 5))
    with pytest.raises(ValueError, match="out must match x"):
        K.rms_norm(x, w, out=torch.empty(1, 8, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must have the strides"):
        K.rms_norm(x, w, out=torch.empty_like(x).to(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="out must have the strides"):
        K.rms_norm(x[..., ::2], w, out=torch.empty(1, 8, 4, 4)[..., ::2])
    with pytest.raises(ValueError, match="inference"):
        K.rms_norm(x.clone().requires_grad_(True), w, out=torch.empty_like(x))


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, w: K.rms_norm(x[0, 0], w), ValueError, "x must have rank"),
        (lambda x, w: K.rms_norm(x[None, None], w), ValueError, "x must have rank"),
        (lambda x, w: K.rms_norm(x.numpy(), w), TypeError, "x must be a torch.Tensor"),
        (lambda x, w: K.rms_norm(x.int(), w), TypeError, "x must be a floating"),
        (lambda x, w: K.rms_norm(x, torch.ones(7)), ValueError, "weight must have 8 elements"),
        (lambda x, w: K.rms_norm(x, torch.ones(8, 2)), ValueError, "weight must have 8"),
        (lambda x, w: K.rms_norm(x, [1.0] * 8), TypeError, "weight must be a torch.Tensor"),
        (lambda x, w: K.rms_norm(x, w, torch.ones(9)), ValueError, "bias must have 8"),
        (lambda x, w: K.rms_norm(x, w, 1.0), TypeError, "bias must be a torch.Tensor"),
        (lambda x, w: K.rms_norm(x, w.to("meta")), ValueError, "weight is on meta"),
        (lambda x, w: K.rms_norm(x, w, w.to("meta")), ValueError, "bias is on meta"),
        (lambda x, w: K.rms_norm(x.half(), w.double()), TypeError, "weight must have x's"),
        (lambda x, w: K.rms_norm(x.half(), w.half(), w.bfloat16()), TypeError, "bias must"),
        (lambda x, w: K.rms_norm(x, w.half()), TypeError, "weight must have x's dtype"),
        (lambda x, w: K.rms_norm(x, w, eps=-1.0), ValueError, "eps"),
        (lambda x, w: rn.not_supported_reasons(x, torch.ones(3)), ValueError, "weight"),
    ],
    ids=[
        "rank2", "rank6", "numpy", "int", "weight-size", "weight-size-2d", "weight-list",
        "bias-size", "bias-number", "weight-device", "bias-device", "weight-dtype",
        "bias-dtype", "half-weight-for-fp32", "eps", "reasons-check",
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    x = torch.randn(2, 8, 3, 3)
    w = torch.ones(8)
    with pytest.raises(exc, match=match):
        call(x, w)


@pytest.mark.cuda
def test_mixed_cuda_cpu_devices_raise():
    x = torch.randn(1, 8, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        K.rms_norm(x, torch.ones(8))
    with pytest.raises(ValueError, match="bias is on cpu"):
        K.rms_norm(x, torch.ones(8, device="cuda"), torch.ones(8))


# -------------------------------------------------------------------------- dispatch
def test_package_exports_the_op():
    importlib.import_module("sdvae.kernels.rms_norm")
    assert callable(K.rms_norm) and K.rms_norm is rn.rms_norm
    assert K.rms_norm_reference is rn.rms_norm_reference
    assert "rms_norm" in K.__all__ and "rms_norm_reference" in K.__all__


def test_cpu_without_interpreter_runs_reference_and_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = _input(1, 8, (4, 4), torch.float16, "cpu", "channels_last")
    w, b = _affine(8, torch.float16, "cpu")
    assert any("TRITON_INTERPRET" in r for r in rn.not_supported_reasons(x, w, b))
    want = rn.rms_norm_reference(x, w, b, silu=True)
    y = K.rms_norm(x, w, b, silu=True)
    assert torch.equal(y, want)
    _check_layout(y, x)
    assert K.rms_norm(x, w, b, silu=True, out=x) is x  # out= on the reference path
    assert torch.equal(x, want)


def test_inputs_requiring_grad_run_the_differentiable_reference():
    x = _input(1, 8, (3, 3), torch.float32, "cpu", "contiguous").requires_grad_()
    w, b = _affine(8, torch.float32, "cpu", shape=(8, 1, 1))
    w.requires_grad_()
    assert any("grad" in r for r in rn.not_supported_reasons(x, w, b))
    y = K.rms_norm(x, w, b, silu=True)
    y.square().sum().backward()
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    rn.rms_norm_reference(x2, w2, b, silu=True).square().sum().backward()
    assert_close(x.grad, x2.grad.double(), torch.float32, name="x.grad")
    assert_close(w.grad, w2.grad.double(), torch.float32, name="weight.grad")
    with torch.no_grad():  # grad mode off: the kernel's rule again
        reasons = rn.not_supported_reasons(x, w, b)
    assert not any("grad" in r for r in reasons)


# ------------------------------------------------------------------- torch.library op
def test_torch_library_op_matches_and_backpropagates(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 5), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device, shape=(8, 1, 1))
    y = torch.ops.sdvae.rms_norm(x, w, b, 1e-12, True)
    _check_layout(y, x)
    _close(y, _ref(x, w, b, True), torch.float32)
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
    torch.ops.sdvae.rms_norm(xr, wr, None, 1e-12, True).sum().backward()
    xr2, wr2 = (t.detach().clone().requires_grad_() for t in (x, w))
    rn.rms_norm_reference(xr2, wr2, None, silu=True).sum().backward()
    assert_close(xr.grad, xr2.grad.double(), torch.float32, name="x.grad")
    assert_close(wr.grad, wr2.grad.double(), torch.float32, name="weight.grad")


def test_opcheck(device):
    _device_or_skip(device)
    x = _input(1, 8, (3, 3), torch.float32, device, "channels_last")
    w, b = _affine(8, torch.float32, device)
    x5 = _input(1, 8, (2, 3, 3), torch.float16, device, "channels_last")
    for args in [
        (x, w, b, 1e-12, True),
        (x.contiguous(), w.reshape(8, 1, 1), None, 1e-6, False),
        (x5, w.half().reshape(8, 1, 1, 1), b, 1e-12, True),
        (x5, w.half(), None, 1e-12, True, b.half()),  # the input bias
    ]:
        torch.library.opcheck(torch.ops.sdvae.rms_norm.default, args)


def test_compiles_without_graph_break(device):
    _device_or_skip(device)
    x = _input(1, 8, (2, 3, 3), torch.float32, device, "contiguous")
    w, b = _affine(8, torch.float32, device, shape=(8, 1, 1, 1))

    def f(t):
        return K.rms_norm(t * 2, w, b, silu=True) + 1, K.rms_norm(t, w, 0.0)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    _close(out[0], _ref(x * 2, w, b, True) + 1, torch.float32)
    _close(out[1], _ref(x, w, None, False), torch.float32)


# ------------------------------------------------------------------------- launch rule
WAN_CHANNELS = (96, 160, 192, 256, 320, 384, 512, 640, 1024)  # Wan 2.1 and 2.2 VAE norms


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_plan_follows_the_rule(itemsize, cl, vector):
    for c in (1, 3, 8, 12, 40, 1000, 1025, 4096, *WAN_CHANNELS):
        p = rn.plan(c, cl, itemsize, vector)
        assert p.block_c == max(8, min(rn._next_pow2(c), rn.MAX_BLOCK_C))
        assert p.one_block == (c <= p.block_c)
        values = p.block_c * p.block_p
        per_thread = values // (32 * p.num_warps)
        limit = 16 // (2 if itemsize == 8 else 1) // (1 if vector else 2)
        assert per_thread <= limit or p.num_warps == rn.MAX_WARPS, p
        assert per_thread <= 2 * limit, p
        if cl:
            assert values == rn.TILE // (2 if itemsize == 8 else 1), p
        else:  # a full 32-byte sector per channel row (16 bytes with scalar accesses)
            assert p.block_p * itemsize >= (32 if vector else 16), p
    # the Wan 2.1 / 2.2 channel counts run from registers, x read once
    assert all(rn.plan(c, cl, itemsize, vector).one_block for c in WAN_CHANNELS)
    # with an input bias no thread holds more than its per-thread values (a register for the
    # bias beside each): the channel block halves where the warp cap would leave more
    for c in (12, 40, 1000, 4096, *WAN_CHANNELS):
        p = rn.plan(c, cl, itemsize, vector, input_bias=True)
        per_thread = p.block_c * p.block_p // (32 * p.num_warps)
        assert per_thread <= 16 // (2 if itemsize == 8 else 1) // (1 if vector else 2), p
        assert p.one_block == (c <= p.block_c)
        if p != rn.plan(c, cl, itemsize, vector):
            assert p.block_c < rn.plan(c, cl, itemsize, vector).block_c and not cl, p


def test_launcher_picks_scalar_tiles_for_unaligned_rows(monkeypatch):
    """The launcher's ``vector`` flag follows what the JIT specialises on (16-byte aligned
    x and y, C or S divisible by 16): a plan for vector accesses is never launched on a
    tensor that compiles to scalar ones (whose registers the AOT test checks separately)."""
    if not INTERPRET:
        pytest.skip("the reference runs on CPU tensors without the interpreter")
    seen = []
    real = rn.plan
    monkeypatch.setattr(rn, "plan", lambda *a, **k: seen.append(a) or real(*a, **k))
    w = torch.ones(16)
    x = torch.randn(1, 16, 4, 4)
    unaligned = torch.randn(16 * 16 + 1)[1:].view(1, 16, 4, 4)  # 4 bytes past an allocation
    assert unaligned.data_ptr() % 16 != 0
    K.rms_norm(x, w)  # S = 16
    K.rms_norm(x[..., :3], w)  # other strides: made contiguous, S = 12
    K.rms_norm(torch.randn(1, 16, 3, 5).to(memory_format=torch.channels_last), w)  # C = 16
    K.rms_norm(unaligned, w)
    assert [a[3] for a in seen] == [True, False, True, False]


# ---------------------------------------------------------------------- AOT compile
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def _config(dt, wdt, cl, c, *, vector=True, has_b=True, silu=True, rows="i32",
            x_aligned=True, ones=(), has_ib=True):  # fmt: skip
    """One launch configuration: the plan's tile for ``c`` channels; ``vector``: C and S
    divisible by 16 (the JIT's specialisation), else neither; ``x_aligned``: x's pointer too;
    ``ones``: integer arguments equal to 1, which the JIT turns into constants."""
    p = rn.plan(c, cl, _ITEMSIZE[dt], vector and x_aligned, input_bias=has_ib)
    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{wdt}", "b_ptr": f"*{wdt}", "ib_ptr": f"*{wdt}",
           "y_ptr": f"*{dt}"}  # fmt: skip
    sig.update(C="i32", S="i32", rows=rows, eps="fp32")
    constexprs = dict(
        BLOCK_C=p.block_c, BLOCK_P=p.block_p, CL=cl, ONE_BLOCK=p.one_block, HAS_B=has_b,
        HAS_IB=has_ib, SILU=silu, F64=dt == "fp64",
    )  # fmt: skip
    divisible = [a for a in sig if sig[a].startswith("*") and (x_aligned or a != "x_ptr")]
    divisible += ["C", "S"] if vector else []
    for name in ones:
        del sig[name]
        constexprs[name] = 1
    divisible = [a for a in divisible if a in sig]
    return {"signature": sig, "constexprs": constexprs, "num_warps": p.num_warps,
            "num_stages": 3, "divisible_by_16": divisible}  # fmt: skip


_REAL_C = (96, 192, 384, 1024, 2048)  # tiles of 128, 256, 512, 1024 channels; the loop


def _aot_configs() -> list[dict]:
    """The real channel counts (Wan 2.1: 96/192/384 -> blocks of 128/256/512; Wan 2.2 up to
    1024; 2048: the channel loop) in fp16/bf16/fp32, both layouts, bias and SiLU on (the
    largest variant), with and without the input bias, vector accesses; the same tiles with
    scalar accesses (C and S not divisible by 16), the dtypes rotated; x unaligned (384, 1024
    channels); float64 at the largest tiles (1024 channels, the loop); the smaller blocks (8
    to 64 channels) with dtypes, weight dtypes and flags (the input bias's too) rotated; one
    64-bit row count (channels-last tensors of 2^31 pixel rows and more); arguments the JIT
    specialises to the constant 1."""
    out = []
    rot = [("fp16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32"), ("fp64", "fp32")]
    for cl in (False, True):
        for i, c in enumerate(_REAL_C):
            out += [_config(dt, dt, cl, c, has_ib=ib) for dt in ("fp16", "bf16", "fp32")
                    for ib in (False, True)]  # fmt: skip
            dt, wdt = rot[i % 4]
            out.append(_config(dt, wdt, cl, c, vector=False, has_b=i % 2 == 0,
                               has_ib=i % 2 == 1))  # fmt: skip
            if c in (384, 1024):
                out.append(_config(rot[i % 3][0], "fp32", cl, c, x_aligned=False))
            if c in (1024, 2048):
                out.append(_config("fp64", "fp64", cl, c, vector=c == 1024, silu=c == 2048))
        for i, c in enumerate((3, 12, 24, 40)):
            dt, wdt = rot[i]
            out.append(_config(dt, wdt, cl, c, vector=i % 2 == 1, has_b=i < 2, silu=i > 0,
                               has_ib=i % 2 == 0))  # fmt: skip
    out.append(_config("fp16", "fp16", True, 96, rows="i64"))
    # one tile per sample (contiguous, S <= BLOCK_P); one channel over one pixel row
    out.append(_config("bf16", "fp32", False, 384, vector=False, ones=("rows",)))
    out.append(_config("fp32", "fp32", True, 1, vector=False, ones=("C", "rows")))
    return out


def test_every_launch_configuration_compiles_for_sm80_and_sm90_without_spills():
    configs = _aot_configs()
    halves = [configs[::2], configs[1::2]]  # one compile worker per core
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(aot_compile, "sdvae.kernels.rms_norm", "_rms_norm_kernel", h,
                        no_spills=True)
            for h in halves
        ]  # fmt: skip
        results = [r for f in futures for r in f.result()]
    assert len(results) == 2 * len(configs)
    assert sorted({r["cc"] for r in results}) == [80, 90]
    for r in results:  # what the module header promises: a few KB of shared memory
        assert r["shared"] <= 8192, r


# ------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c", [96, 384, 1024, 2048])
@torch.no_grad()
def test_wan_shapes_on_gpu(c, dtype, layout):
    x = _input(1, c, (3, 30, 52), dtype, "cuda", layout)
    w, b = _affine(c, dtype, "cuda", shape=(c, 1, 1, 1))
    y = K.rms_norm(x, w, b, silu=True)
    _check_layout(y, x)
    _close(y, _ref(x, w, b, True), dtype, name=f"C={c}")
    ib = b.flip(0)  # a conv's bias in the loads: the channel loop at 1024 contiguous
    want = rn.rms_norm_reference(_d(x), _d(w), _d(b), silu=True, input_bias=_d(ib))
    _close(K.rms_norm(x, w, b, silu=True, input_bias=ib), want, dtype, name=f"C={c} +ib")


@pytest.mark.cuda
@pytest.mark.serial
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_over_2_31_elements_on_gpu(layout):
    """(1, 1024, 3, 1024, 1024) fp16 = 3 * 2^30 values (12 GiB for x and y): channel offsets
    past 2^31 in the contiguous layout, pixel rows times C past it in channels-last."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.randn(1, 1024, 3, 1024, 1024, device="cuda", dtype=torch.float16)
    x = _to_layout(x, layout)
    assert x.numel() > 2**31
    w, b = _affine(1024, torch.float16, "cuda")
    y = K.rms_norm(x, w, b)
    for t in range(3):
        for h0 in range(0, 1024, 256):
            sl = (slice(None), slice(None), slice(t, t + 1), slice(h0, h0 + 256))
            ref = rn.rms_norm_reference(x[sl].float(), w.float(), b.float())
            assert_close(y[sl], ref, torch.float16, name=f"frame {t}, rows {h0}")
