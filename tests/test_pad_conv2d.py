"""sdvae.ops.pad_conv2d (C++/CUDA extension) against a float64 F.pad + F.conv2d.

CPU cases run the C++ kernel; the same cases with CUDA tensors run the cuDNN graph conv with
pre/post padding (the ``cuda`` marker, skipped without a GPU). Registration: opcheck, fake
tensors, torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from sdvae import _ext, ops
from sdvae.ops import pad_conv2d, pad_conv2d_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"{_ext.LOAD_ERROR}")

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (N, C, H, W, Cout, K): odd and even sizes, 1x1 / 3x3 / 4x4 kernels, channels not multiples of 8
# and multiples of 8, a 2x2 input.
SHAPES = [
    (1, 3, 8, 8, 4, 3),
    (2, 5, 7, 9, 6, 3),
    (1, 4, 5, 6, 3, 1),
    (2, 8, 9, 7, 16, 4),
    (1, 16, 2, 2, 8, 3),
]
PADDINGS = [(0, 1, 0, 1), (0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 3, 1), (5, 4, 0, 6)]


def _inputs(shape, dtype, device, fmt, with_bias):
    n, c, h, w, cout, k = shape
    x = (torch.randn(n, c, h, w) + 0.3).to(device, dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(cout, c, k, k) / (c * k * k) ** 0.5).to(device, dtype)
    b = torch.randn(cout).to(device, dtype) if with_bias else None
    return x, wt, b


def _ref64(x, w, b, stride, padding):
    return pad_conv2d_reference(
        x.double().cpu(),
        w.double().cpu(),
        None if b is None else b.double().cpu(),
        stride=stride,
        padding=padding,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(device, shape, stride, padding, layout, with_bias, dtype):
    x, w, b = _inputs(shape, dtype, device, FORMATS[layout], with_bias)
    hp, wp = shape[2] + padding[2] + padding[3], shape[3] + padding[0] + padding[1]
    if hp < shape[5] or wp < shape[5]:
        with pytest.raises(ValueError, match="padding"):
            pad_conv2d(x, w, b, stride=stride, padding=padding)
        return
    out = pad_conv2d(x, w, b, stride=stride, padding=padding)
    ref = _ref64(x, w, b, stride, padding)
    assert out.dtype == dtype and out.device == x.device
    assert_close(out, ref, dtype, name=f"pad_conv2d {shape} s{stride} {padding} {layout}")
    if layout == "nhwc" and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("size", [32, 33])
def test_encoder_downsample_shape(device, size, layout, dtype):
    # The encoder's downsample at a small size: 3x3, stride 2, pad (0, 1, 0, 1), Cin = Cout.
    x, w, b = _inputs((2, 64, size, size, 64, 3), dtype, device, FORMATS[layout], True)
    out = pad_conv2d(x, w, b)
    assert out.shape == (2, 64, (size + 1 - 3) // 2 + 1, (size + 1 - 3) // 2 + 1)
    assert_close(out, _ref64(x, w, b, 2, (0, 1, 0, 1)), dtype)


def test_many_tiles_and_batch(device):
    # More output pixels than one CPU tile in both GEMM dimensions.
    x, w, b = _inputs((3, 24, 70, 45, 136, 3), torch.float32, device, torch.contiguous_format, True)
    out = pad_conv2d(x, w, b, stride=1, padding=(1, 2, 0, 3))
    assert_close(out, _ref64(x, w, b, 1, (1, 2, 0, 3)), torch.float32)


# Outputs of 4x4 and more: on the CPU these take ATen's convolution with the padding inside it
# (the smaller ones above take the tiled kernel), with the outputs it computes beyond ours
# dropped; every padding, stride and kernel size, both layouts.
LARGE_SHAPES = [(2, 5, 23, 19, 7, 3), (1, 6, 17, 20, 4, 4), (2, 3, 12, 13, 5, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", LARGE_SHAPES)
def test_large_outputs_match_float64_reference(device, shape, stride, padding, layout, dtype):
    x, w, b = _inputs(shape, dtype, device, FORMATS[layout], stride != 2)
    out = pad_conv2d(x, w, b, stride=stride, padding=padding)
    assert_close(out, _ref64(x, w, b, stride, padding), dtype, name=f"{shape} s{stride} {padding}")
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_tiled_kernel_many_tiles(device, layout):
    # Two output columns (the CPU's tiled kernel) but 4002 output pixels per image: several
    # tiles per image, and a short last tile.
    x, w, b = _inputs((3, 24, 2000, 3, 136, 3), torch.float32, device, FORMATS[layout], True)
    out = pad_conv2d(x, w, b, stride=1, padding=(0, 1, 2, 1))
    assert out.shape == (3, 136, 2001, 2)
    assert_close(out, _ref64(x, w, b, 1, (0, 1, 2, 1)), torch.float32)


def test_non_contiguous_input_is_made_contiguous(device):
    x, w, b = _inputs((2, 6, 12, 10, 5, 3), torch.float32, device, torch.contiguous_format, True)
    xs = x[:, :, 1:-1, ::2]  # neither NCHW- nor NHWC-contiguous
    out = pad_conv2d(xs, w, b)
    assert out.is_contiguous()
    assert_close(out, _ref64(xs, w, b, 2, (0, 1, 0, 1)), torch.float32)


def test_grad_runs_the_reference(device):
    x, w, b = _inputs((1, 4, 6, 6, 3, 3), torch.float32, device, torch.contiguous_format, True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert any("requires grad" in r for r in ops.not_supported_reasons(x, w, b))
    out = pad_conv2d(x, w, b)
    out.square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.conv2d(F.pad(x2, (0, 1, 0, 1)), w2, b, stride=2).square().sum().backward()
    assert_close(x.grad, x2.grad.double(), torch.float32, name="x.grad")
    assert_close(w.grad, w2.grad.double(), torch.float32, name="w.grad")


def test_inference_mode(device):
    x, w, b = _inputs((1, 8, 9, 9, 8, 3), torch.float32, device, torch.channels_last, True)
    with torch.inference_mode():
        out = pad_conv2d(x, w, b)
    assert_close(out, _ref64(x, w, b, 2, (0, 1, 0, 1)), torch.float32)


def test_empty_batch(device):
    x, w, b = _inputs((1, 3, 5, 5, 4, 3), torch.float32, device, torch.contiguous_format, True)
    out = pad_conv2d(x[:0], w, b)
    assert out.shape == (0, 4, 2, 2)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck(device, layout):
    x, w, b = _inputs((2, 8, 7, 6, 5, 3), torch.float32, device, FORMATS[layout], True)
    torch.library.opcheck(torch.ops.sdvae.pad_conv2d.default, (x, w, b, 2, [0, 1, 0, 1]))
    torch.library.opcheck(torch.ops.sdvae.pad_conv2d.default, (x, w, None, 1, [2, 0, 1, 3]))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_torch_compile_fullgraph(device, layout):
    x, w, b = _inputs((1, 8, 10, 11, 6, 3), torch.float32, device, FORMATS[layout], True)

    def f(x, w, b):
        return pad_conv2d(x, w, b).relu() * 2.0

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="inductor")(x, w, b)
    ref = _ref64(x, w, b, 2, (0, 1, 0, 1)).relu() * 2.0
    assert_close(out, ref, torch.float32)


def test_no_extension_raises_with_the_reason(monkeypatch):
    x, w, b = _inputs((1, 3, 5, 5, 4, 3), torch.float32, "cpu", torch.contiguous_format, True)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "sdvae._C could not be loaded: simulated")
    with pytest.raises(RuntimeError, match="simulated"):
        pad_conv2d(x, w, b)
    assert any("simulated" in r for r in ops.not_supported_reasons(x, w, b))


def test_not_supported_reasons_empty_for_supported_cpu_input():
    x, w, b = _inputs((1, 3, 5, 5, 4, 3), torch.float32, "cpu", torch.contiguous_format, True)
    assert ops.not_supported_reasons(x, w, b) == []
    assert ops.not_supported_reasons(x.double())  # float64 is not a kernel dtype


def _bad(**over):
    x = torch.randn(1, 4, 6, 6)
    args = {"x": x, "weight": torch.randn(3, 4, 3, 3), "bias": torch.randn(3)}
    kw = {"stride": 2, "padding": (0, 1, 0, 1)}
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return args, kw


@pytest.mark.parametrize(
    "over, exc, match",
    [
        ({"x": torch.randn(4, 6, 6)}, ValueError, "x must be 4-D"),
        ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
        ({"weight": torch.randn(3, 4, 3)}, ValueError, "weight must be 4-D"),
        ({"weight": torch.randn(3, 5, 3, 3)}, ValueError, "weight has 5 input channels"),
        ({"bias": torch.randn(4)}, ValueError, "bias must have shape"),
        ({"bias": torch.randn(3, 1)}, ValueError, "bias must have shape"),
        ({"bias": torch.randn(3, dtype=torch.float64)}, TypeError, "bias dtype"),
        ({"weight": torch.randn(3, 4, 3, 3).half()}, TypeError, "weight dtype"),
        ({"x": torch.randn(1, 4, 6, 6).double()}, TypeError, "x must be float32"),
        ({"x": torch.randint(0, 5, (1, 4, 6, 6))}, TypeError, "x must be float32"),
        ({"weight": torch.randn(3, 4, 3, 3, device="meta")}, ValueError, "weight is on meta"),
        ({"stride": 0}, ValueError, "stride must be >= 1"),
        ({"stride": 1.5}, TypeError, "stride must be an int"),
        ({"stride": True}, TypeError, "stride must be an int"),
        ({"padding": (0, 1, 0)}, ValueError, "padding must have 4 values"),
        ({"padding": (0, -1, 0, 1)}, ValueError, "padding must be non-negative"),
        ({"padding": (0, 1.0, 0, 1)}, TypeError, "padding values must be ints"),
        ({"padding": 1}, TypeError, "padding must be a sequence"),
        ({"weight": torch.randn(3, 4, 9, 3)}, ValueError, "smaller than the weight"),
    ],
)
def test_bad_inputs(over, exc, match):
    args, kw = _bad(**over)
    with pytest.raises(exc, match=match):
        pad_conv2d(args["x"], args["weight"], args["bias"], **kw)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (
            (torch.randn(4, 6, 6), torch.randn(3, 4, 3, 3), None, 2, [0, 1, 0, 1]),
            ValueError,
            "x must be 4-D",
        ),
        (
            (torch.randn(1, 4, 6, 6), torch.randn(3, 2, 3, 3), None, 2, [0, 1, 0, 1]),
            ValueError,
            "weight has 2 input channels",
        ),
        (
            (torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.randn(2), 2, [0, 1, 0, 1]),
            ValueError,
            "bias must have shape",
        ),
        (
            (torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3), None, 2, [0, -1, 0, 1]),
            ValueError,
            "padding must be non-negative",
        ),
        (
            (torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3), None, 0, [0, 1, 0, 1]),
            ValueError,
            "stride must be >= 1",
        ),
        (
            (torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3).half(), None, 2, [0, 1, 0, 1]),
            TypeError,
            "weight dtype",
        ),
    ],
)
def test_bad_inputs_reach_the_cpp_checks(args, exc, match):
    # Calling the registered op directly skips the Python checks; C++ raises the same types.
    with pytest.raises(exc, match=match):
        torch.ops.sdvae.pad_conv2d(*args)


def test_cpu_bench_suite_runs():
    from sdvae.bench import engine

    ctx = engine.Context(device=torch.device("cpu"), quick=True)
    rows = engine.run(ctx, ["pad_conv2d"], rep_ms=1)
    got = {(r.shape, r.dtype, r.layout, r.provider) for r in rows}
    for shape in ("1x128x512x512 -> 256x256", "1x256x256x256 -> 128x128", "1x512x128x128 -> 64x64"):
        for provider in ("eager", "sdvae"):
            assert (shape, "fp32", "nchw", provider) in got
    assert all(r.median_ms and r.median_ms > 0 and r.tflops > 0 for r in rows)


def test_kernels_registered_for_cpu_and_cuda():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("sdvae::pad_conv2d", "CPU")
    # The CUDA kernel (the cuDNN graph conv) is compiled and registered whenever the extension
    # was built with nvcc, with or without a GPU on the build machine.
    assert has("sdvae::pad_conv2d", "CUDA") == _ext.with_cuda()
