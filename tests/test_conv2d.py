"""sdvae.ops.conv2d (C++ CPU kernel / cuDNN graph on CUDA) against a float64 eager reference.

CPU cases run the C++ CPU path; the same cases with CUDA tensors run the cuDNN graph (``cuda``
marker, skipped without a GPU), where the plan cache, the TF32 switch and the fused epilogue
are checked too. Registration: opcheck, fake tensors, torch.compile(fullgraph=True).

The graph conv's decisions are host code compiled into every build and tested here on the CPU:
the batch split that keeps cuDNN under 2**31 elements per tensor, the fallback ladder (fused
graph -> bare graph + ATen adds -> eager), the plan cache's policy (per cuDNN handle, i.e. per
thread; refusals cached, failures for now not), and the workspace limit. The ``cuda`` tests run
the real thing; ``graph_conv`` ones skip, with the build's reason, without the graph conv.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_close, graph_conv_missing_reason

from sdvae import _ext, ops
from sdvae.ops import conv2d, conv2d_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"{_ext.LOAD_ERROR}")

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PADDINGS = [(1, 1, 1, 1), (0, 1, 0, 1), (0, 0, 0, 0), (2, 0, 1, 3)]


def _inputs(shape, dtype, device, fmt, *, bias=True, residual=False, stride=1, padding=(1,) * 4):
    n, c, h, w, cout, k = shape
    x = (torch.randn(n, c, h, w) + 0.3).to(device, dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(cout, c, k, k) / (c * k * k) ** 0.5).to(device, dtype)
    wt = wt.contiguous(memory_format=fmt)
    b = torch.randn(cout).to(device, dtype) if bias else None
    r = None
    if residual:
        left, right, top, bottom = padding
        oh = (h + top + bottom - k) // stride + 1
        ow = (w + left + right - k) // stride + 1
        r = torch.randn(n, cout, oh, ow).to(device, dtype).contiguous(memory_format=fmt)
    return x, wt, b, r


def _ref64(x, w, b, r, stride, padding):
    def d(t):
        return None if t is None else t.double().cpu()

    return conv2d_reference(d(x), d(w), d(b), stride=stride, padding=padding, residual=d(r))


def _dtypes(device):
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", PADDINGS)
def test_matches_float64_reference(device, padding, stride, with_bias, with_residual, layout):
    shape = (2, 5, 9, 8, 6, 3)
    for dtype in _dtypes(device):
        x, w, b, r = _inputs(
            shape,
            dtype,
            device,
            FORMATS[layout],
            bias=with_bias,
            residual=with_residual,
            stride=stride,
            padding=padding,
        )
        out = conv2d(x, w, b, stride=stride, padding=padding, residual=r)
        assert out.dtype == dtype and out.device == x.device
        assert_close(
            out, _ref64(x, w, b, r, stride, padding), dtype, name=f"{dtype} {padding} s{stride}"
        )
        assert out.is_contiguous(memory_format=FORMATS[layout])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("fuse_epilogue", [True, False])
def test_bare_and_epilogue_variants_agree(device, fuse_epilogue, layout):
    # fuse_epilogue=False: the bare graph conv, then bias and residual added by ATen.
    for dtype in _dtypes(device):
        x, w, b, r = _inputs((1, 8, 10, 7, 8, 3), dtype, device, FORMATS[layout], residual=True)
        out = conv2d(x, w, b, residual=r, fuse_epilogue=fuse_epilogue)
        assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), dtype)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_vae_block_convs(device, layout):
    # A resnet block's second conv (3x3, pad 1, + the shortcut) and a 1x1 channel-changing
    # shortcut (no padding), at small sizes.
    fmt = FORMATS[layout]
    x, w, b, r = _inputs((1, 16, 12, 12, 16, 3), torch.float32, device, fmt, residual=True)
    out = conv2d(x, w, b, residual=r)
    assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float32)
    x, w, b, _ = _inputs((1, 16, 12, 12, 8, 1), torch.float32, device, fmt)
    out = conv2d(x, w, b, padding=(0, 0, 0, 0))
    assert_close(out, _ref64(x, w, b, None, 1, (0, 0, 0, 0)), torch.float32)


def test_mixed_layouts_follow_x(device):
    # An NCHW weight and residual with an NHWC x: the output is NHWC and exact.
    x, w, b, r = _inputs((1, 8, 9, 9, 8, 3), torch.float32, device, torch.channels_last)
    r = torch.randn(1, 8, 9, 9).to(device)
    out = conv2d(x, w.contiguous(), b, residual=r)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float32)


def test_non_contiguous_input_is_made_contiguous(device):
    x, w, b, _ = _inputs((2, 6, 12, 10, 5, 3), torch.float32, device, torch.contiguous_format)
    xs = x[:, :, 1:-1, ::2]
    out = conv2d(xs, w, b)
    assert out.is_contiguous()
    assert_close(out, _ref64(xs, w, b, None, 1, (1, 1, 1, 1)), torch.float32)


def test_empty_batch(device):
    x, w, b, _ = _inputs((1, 3, 5, 5, 4, 3), torch.float32, device, torch.contiguous_format)
    assert conv2d(x[:0], w, b).shape == (0, 4, 5, 5)


def test_grad_runs_the_reference(device):
    x, w, b, r = _inputs(
        (1, 4, 6, 6, 3, 3), torch.float32, device, torch.contiguous_format, residual=True
    )
    x.requires_grad_(True)
    r.requires_grad_(True)
    assert any("requires grad" in s for s in ops.not_supported_reasons(x, w, b, r))
    conv2d(x, w, b, residual=r).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    r2 = r.detach().clone().requires_grad_(True)
    conv2d_reference(x2, w, b, residual=r2).square().sum().backward()
    assert_close(x.grad, x2.grad.double(), torch.float32, name="x.grad")
    assert_close(r.grad, r2.grad.double(), torch.float32, name="residual.grad")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck(device, layout):
    x, w, b, r = _inputs(
        (2, 8, 7, 6, 5, 3),
        torch.float32,
        device,
        FORMATS[layout],
        residual=True,
        stride=2,
        padding=(0, 1, 0, 1),
    )
    op = torch.ops.sdvae.conv2d.default
    torch.library.opcheck(op, (x, w, b, 2, [0, 1, 0, 1], r, True))
    torch.library.opcheck(op, (x, w, None, 1, [2, 0, 1, 3], None, False))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_torch_compile_fullgraph(device, layout):
    x, w, b, r = _inputs(
        (1, 8, 10, 11, 8, 3), torch.float32, device, FORMATS[layout], residual=True
    )

    def f(x, w, b, r):
        h = conv2d(x, w, b, residual=r).relu()
        return ops.pad_conv2d(h, w, b) * 2.0

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="inductor")(x, w, b, r)
    h = _ref64(x, w, b, r, 1, (1, 1, 1, 1)).relu()
    ref = ops.pad_conv2d_reference(h, w.double().cpu(), b.double().cpu()) * 2.0
    assert_close(out, ref, torch.float32)


def test_ops_do_not_call_the_extension_for_its_build_flags(monkeypatch):
    # Dynamo cannot trace a pybind call: whether the build has CUDA kernels is read at import.
    def boom():
        raise AssertionError("_ext.with_cuda() called inside the op")

    monkeypatch.setattr(_ext, "with_cuda", boom)
    x, w, b, r = _inputs(
        (1, 3, 5, 5, 4, 3), torch.float32, "cpu", torch.contiguous_format, residual=True
    )
    conv2d(x, w, b, residual=r)
    ops.pad_conv2d(x, w, b)


def test_cpu_has_no_plans_and_no_fallbacks():
    before = ops.plan_stats()
    x, w, b, r = _inputs(
        (1, 3, 5, 5, 4, 3), torch.float32, "cpu", torch.contiguous_format, residual=True
    )
    conv2d(x, w, b, residual=r)
    assert ops.plan_stats() == before
    assert set(before) == {"built", "refused", "transient", "cached"}
    assert not any(s.startswith("conv2d 1x3x5x5") for s in ops.fallback_reasons())


def test_no_extension_raises_with_the_reason(monkeypatch):
    x, w, b, _ = _inputs((1, 3, 5, 5, 4, 3), torch.float32, "cpu", torch.contiguous_format)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "sdvae._C could not be loaded: simulated")
    with pytest.raises(RuntimeError, match="simulated"):
        conv2d(x, w, b)
    assert ops.fallback_reasons() == []


def _bad(**over):
    args = {
        "x": torch.randn(1, 4, 6, 6),
        "weight": torch.randn(3, 4, 3, 3),
        "bias": torch.randn(3),
    }
    kw = {"stride": 1, "padding": (1, 1, 1, 1), "residual": torch.randn(1, 3, 6, 6)}
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return args, kw


@pytest.mark.parametrize(
    "over, exc, match",
    [
        ({"x": torch.randn(4, 6, 6)}, ValueError, "x must be 4-D"),
        ({"x": "x"}, TypeError, "x must be a torch.Tensor"),
        ({"weight": torch.randn(3, 4, 3)}, ValueError, "weight must be 4-D"),
        ({"weight": torch.randn(3, 5, 3, 3)}, ValueError, "weight has 5 input channels"),
        ({"bias": torch.randn(4)}, ValueError, "bias must have shape"),
        ({"x": torch.randn(1, 4, 6, 6).double()}, TypeError, "x must be float32"),
        ({"weight": torch.randn(3, 4, 3, 3).half()}, TypeError, "weight dtype"),
        ({"weight": torch.randn(3, 4, 3, 3, device="meta")}, ValueError, "weight is on meta"),
        ({"residual": torch.randn(1, 3, 5, 6)}, ValueError, "residual must have the output's"),
        ({"residual": torch.randn(3, 6, 6)}, ValueError, "residual must have the output's"),
        ({"residual": torch.randn(1, 3, 6, 6).half()}, TypeError, "residual dtype"),
        ({"residual": torch.randn(1, 3, 6, 6, device="meta")}, ValueError, "residual is on"),
        ({"residual": [1.0]}, TypeError, "residual must be a torch.Tensor or None"),
        ({"stride": 0}, ValueError, "stride must be >= 1"),
        ({"stride": 2.0}, TypeError, "stride must be an int"),
        ({"padding": (1, 1)}, ValueError, "padding must have 4 values"),
        ({"padding": (1, -1, 1, 1)}, ValueError, "padding must be non-negative"),
        ({"fuse_epilogue": 1}, TypeError, "fuse_epilogue must be a bool"),
    ],
)
def test_bad_inputs(over, exc, match):
    args, kw = _bad(**over)
    with pytest.raises(exc, match=match):
        conv2d(args["x"], args["weight"], args["bias"], **kw)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (
            (
                torch.randn(1, 4, 6, 6),
                torch.randn(3, 4, 3, 3),
                None,
                1,
                [1] * 4,
                torch.randn(1, 3, 5, 6),
                True,
            ),
            ValueError,
            "conv2d: residual must have the output's shape",
        ),
        (
            (
                torch.randn(1, 4, 6, 6),
                torch.randn(3, 4, 3, 3),
                None,
                1,
                [1] * 4,
                torch.randn(1, 3, 6, 6).double(),
                True,
            ),
            TypeError,
            "conv2d: residual dtype",
        ),
        (
            (torch.randn(4, 6, 6), torch.randn(3, 4, 3, 3), None, 1, [1] * 4, None, True),
            ValueError,
            "conv2d: x must be 4-D",
        ),
        (
            (torch.randn(1, 4, 6, 6).int(), torch.randn(3, 4, 3, 3), None, 1, [1] * 4, None, True),
            TypeError,
            "conv2d: x must be float32",
        ),
    ],
)
def test_bad_inputs_reach_the_cpp_checks(args, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.sdvae.conv2d(*args)


# ------------------------------------------------------ graph conv decisions (host code, CPU)
INT32_MAX = 2**31 - 1


@pytest.mark.parametrize(
    "n, in_per_sample, out_per_sample, want",
    [
        (1, 512 * 64 * 64, 512 * 64 * 64, [1]),
        (8, 1000, 2000, [8]),
        # The decoder's last level at batch 4 x 2048^2: 128 channels in and out, 2^31 elements.
        (4, 128 * 2048 * 2048, 128 * 2048 * 2048, [2, 2]),
        # Its 256 -> 128 channel conv: 2^30 elements per sample in.
        (4, 256 * 2048 * 2048, 128 * 2048 * 2048, [1, 1, 1, 1]),
        # One element under the limit in total: no split.
        (3, INT32_MAX // 3, 5, [3]),
        (7, 2**29, 2**28, [3, 3, 1]),
        (5, 10, 2**30, [1, 1, 1, 1, 1]),
        # One sample already reaches 2^31: no batch split helps.
        (2, 2**31, 1, []),
        (1, 1, 2**31, []),
        (0, 10, 10, []),
    ],
)
def test_batch_chunks_keep_every_tensor_under_2_31_elements(n, in_per_sample, out_per_sample, want):
    chunks = _ext._C.conv2d_batch_chunks(n, in_per_sample, out_per_sample)
    assert chunks == want
    if chunks:
        assert sum(chunks) == n
        per = max(in_per_sample, out_per_sample)
        assert all(c * per <= INT32_MAX for c in chunks)
        fit = INT32_MAX // per
        assert len(chunks) == -(-n // fit)  # as few chunks as possible


@pytest.mark.parametrize(
    "fused, outcomes, path, attempts, why",
    [
        (True, ["ran"], "fused graph", [True], ""),
        (False, ["ran"], "bare graph", [False], ""),
        # A refused fused graph tries the bare graph (+ ATen adds) before eager.
        (True, ["refused", "ran"], "bare graph", [True, False], "fused graph refused by cuDNN"),
        (True, ["refused", "refused"], "eager", [True, False], "bare graph refused by cuDNN"),
        (False, ["refused"], "eager", [False], "graph refused by cuDNN"),
        (True, ["transient", "ran"], "bare graph", [True, False], "failed for now, not cached"),
        (True, ["transient", "transient"], "eager", [True, False], "failed for now"),
    ],
)
def test_fallback_ladder(fused, outcomes, path, attempts, why):
    got_path, got_why, got_attempts = _ext._C._conv2d_ladder_probe(fused, outcomes)
    assert (got_path, got_attempts) == (path, attempts)
    assert why in got_why and (why == "") == (got_why == "")


def test_plan_cache_keeps_refusals_not_failures_for_now_per_handle():
    probe = _ext._C._plan_cache_probe
    # A refusal is cached: the same key on the same handle never builds again.
    assert probe([(1, 7, "refused"), (1, 7, "refused"), (1, 7, "ran")]) == [True, False, False]
    # A failure for now (e.g. out of memory while building) is not: the next call tries again.
    assert probe([(1, 8, "transient"), (1, 8, "ran"), (1, 8, "ran")]) == [True, True, False]
    # One plan per cuDNN handle: torch gives each thread its own, so threads never share a plan.
    assert probe([(1, 9, "ran"), (2, 9, "ran"), (1, 9, "ran"), (2, 9, "ran")]) == [
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "message, transient",
    [
        (
            "build_plans: cudnnBackendFinalize failed with message: , and code: "
            "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
            True,
        ),
        ("code: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED", True),
        ("building the plan: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("check_support: [cudnn_frontend] Error: No execution plans support the graph.", False),
        ("validate: CUDNN_STATUS_NOT_SUPPORTED", False),
    ],
)
def test_transient_failures_are_allocations(message, transient):
    assert _ext._C._conv2d_failure_is_transient(message) is transient


@pytest.mark.parametrize(
    "value, limit",
    [
        (None, 2**30),
        ("", 2**30),
        ("0", 0),
        ("268435456", 2**28),
        ("256MiB", 2**28),
        ("2GiB", 2**31),
        ("64KiB", 2**16),
        ("100B", 100),
    ],
)
def test_workspace_limit_from_the_environment(monkeypatch, value, limit):
    if value is None:
        monkeypatch.delenv("SDVAE_CONV_WORKSPACE_LIMIT", raising=False)
    else:
        monkeypatch.setenv("SDVAE_CONV_WORKSPACE_LIMIT", value)
    assert _ext._C.conv2d_workspace_limit() == limit


@pytest.mark.parametrize("value", ["1.5GiB", "-1", "256MB", "GiB", "lots", "9" * 20])
def test_bad_workspace_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("SDVAE_CONV_WORKSPACE_LIMIT", value)
    with pytest.raises(ValueError, match="SDVAE_CONV_WORKSPACE_LIMIT"):
        _ext._C.conv2d_workspace_limit()


def test_workspace_limit_scope_overrides_nests_and_stays_in_its_thread(monkeypatch):
    """``ops.workspace_limit(n)``: this thread's cap inside the block, over the environment's;
    nested blocks restore the outer cap; other threads keep the environment's; bad values
    are refused naming the argument."""
    monkeypatch.setenv("SDVAE_CONV_WORKSPACE_LIMIT", "64MiB")
    get = _ext._C.conv2d_workspace_limit
    assert get() == 2**26
    with ops.workspace_limit(5 * 2**20):
        assert get() == 5 * 2**20
        with ops.workspace_limit(0):
            assert get() == 0
        assert get() == 5 * 2**20
        seen = []
        t = threading.Thread(target=lambda: seen.append(get()))
        t.start()
        t.join()
        assert seen == [2**26]
    assert get() == 2**26
    with pytest.raises(RuntimeError, match="inside"), ops.workspace_limit(2**20):
        assert get() == 2**20
        raise RuntimeError("inside")
    assert get() == 2**26  # restored when the block raises
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        with ops.workspace_limit(-1):
            pass
    with pytest.raises(TypeError, match="nbytes must be an int"):
        with ops.workspace_limit(1.5):
            pass
    with pytest.raises(ValueError, match="workspace limit must be"):
        _ext._C.conv2d_set_workspace_limit(-2)


@pytest.mark.cuda
@pytest.mark.graph_conv
def test_workspace_limit_scope_keys_the_plan_cache():
    """A conv under a scoped cap builds (and caches) its own plan: a plan chosen under a larger
    cap is never reused under a smaller one; the result is the same."""
    x, w, b, r = _inputs(
        (1, 64, 40, 40, 64, 3), torch.float16, "cuda", torch.channels_last, residual=True
    )
    ref = conv2d(x, w, b, residual=r)
    conv2d(x, w, b, residual=r)
    before = ops.plan_stats()
    with ops.workspace_limit(2**20 + 1):  # a cap no other test uses: a new key
        out = conv2d(x, w, b, residual=r)
    after = ops.plan_stats()
    assert after["built"] + after["refused"] > before["built"] + before["refused"]
    assert_close(out, ref, torch.float16)


def test_graph_conv_tests_skip_with_the_reason_without_the_graph_conv(monkeypatch):
    # Tests that forbid any fallback carry the graph_conv marker; without the graph conv in the
    # build they skip with the build's reason instead of failing.
    for test in (
        test_vae_shapes_on_gpu,
        test_plan_cache_second_call_builds_no_plan,
        test_each_thread_builds_its_own_plan,
        test_batch_over_2_31_elements_is_split,
    ):
        assert "graph_conv" in [m.name for m in test.pytestmark], test.__name__

    real = _ext._C

    class NoGraphConv:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def graph_conv_available():
            return False

        @staticmethod
        def with_cuda():
            return True

    monkeypatch.setattr(_ext, "_C", NoGraphConv())
    reason = graph_conv_missing_reason()
    assert reason is not None and "cudnn-frontend" in reason
    monkeypatch.setattr(_ext, "with_cuda", lambda: False)
    assert "no CUDA kernels" in graph_conv_missing_reason()


def test_kernels_registered_for_cpu_and_cuda():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("sdvae::conv2d", "CPU")
    assert has("sdvae::conv2d", "CUDA") == _ext.with_cuda()


# ---------------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@pytest.mark.graph_conv
def test_plan_cache_second_call_builds_no_plan():
    _ext._C.conv2d_reset_stats()
    x, w, b, r = _inputs(
        (1, 32, 16, 16, 32, 3), torch.float16, "cuda", torch.channels_last, residual=True
    )
    first = conv2d(x, w, b, residual=r)
    want = {"built": 1, "refused": 0, "transient": 0, "cached": 1}
    assert ops.plan_stats() == want, ops.fallback_reasons()
    x2, _, _, r2 = _inputs(
        (1, 32, 16, 16, 32, 3), torch.float16, "cuda", torch.channels_last, residual=True
    )
    second = conv2d(x2, w, b, residual=r2)  # same key, new tensors: no new plan
    assert ops.plan_stats()["built"] == 1
    assert_close(first, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float16)
    assert_close(second, _ref64(x2, w, b, r2, 1, (1, 1, 1, 1)), torch.float16)
    conv2d(x, w, b)  # another epilogue: another plan
    ops.pad_conv2d(x, w, b)  # another padding and stride: another plan
    assert ops.plan_stats()["built"] == 3
    assert ops.fallback_reasons() == []


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_follows_allow_tf32(tf32, fp32_precision_restored):
    from sdvae import _tf32

    x, w, b, r = _inputs(
        (1, 64, 24, 24, 64, 3), torch.float32, "cuda", torch.channels_last, residual=True
    )
    with _tf32.switches(tf32):
        out = conv2d(x, w, b, residual=r)
    assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float32, tf32=tf32)


@pytest.mark.cuda
def test_fp32_after_the_per_op_precision_api(fp32_precision_restored):
    # A program that set torch.backends.cudnn.conv.fp32_precision = "ieee" (which makes the
    # op-less allowTF32CuDNN() raise): the graph conv runs, in true fp32.
    from sdvae import _tf32

    if not _tf32.per_op_api():
        pytest.skip(f"torch {torch.__version__} has no per-operator fp32 API")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    x, w, b, r = _inputs(
        (1, 64, 24, 24, 64, 3), torch.float32, "cuda", torch.channels_last, residual=True
    )
    out = conv2d(x, w, b, residual=r)
    assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float32)


@pytest.mark.cuda
@pytest.mark.graph_conv
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@torch.no_grad()
def test_vae_shapes_on_gpu(dtype, layout):
    # Real channel counts: a 512-channel resnet conv with residual, the 512->256 1x1 shortcut,
    # the 256-channel stride-2 downsample; no shape may fall back.
    _ext._C.conv2d_reset_stats()
    fmt = FORMATS[layout]
    x, w, b, r = _inputs((1, 512, 32, 32, 512, 3), dtype, "cuda", fmt, residual=True)
    assert_close(conv2d(x, w, b, residual=r), _ref64(x, w, b, r, 1, (1, 1, 1, 1)), dtype)
    x, w, b, _ = _inputs((1, 512, 32, 32, 256, 1), dtype, "cuda", fmt)
    out = conv2d(x, w, b, padding=(0, 0, 0, 0))
    assert_close(out, _ref64(x, w, b, None, 1, (0, 0, 0, 0)), dtype)
    x, w, b, _ = _inputs((1, 256, 33, 32, 256, 3), dtype, "cuda", fmt)
    out = ops.pad_conv2d(x, w, b)
    assert_close(out, _ref64(x, w, b, None, 2, (0, 1, 0, 1)), dtype)
    assert ops.fallback_reasons() == []
    assert ops.plan_stats()["refused"] == 0


@pytest.mark.cuda
def test_runs_on_the_current_stream():
    x, w, b, r = _inputs(
        (1, 32, 32, 32, 32, 3), torch.float16, "cuda", torch.channels_last, residual=True
    )
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = conv2d(x, w, b, residual=r)
    s.synchronize()
    assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float16)


@pytest.mark.cuda
@pytest.mark.graph_conv
@torch.no_grad()
def test_each_thread_builds_its_own_plan():
    # cuDNN handles are per thread, and execution plans are not promised to be thread-safe: a
    # second thread with the same call shape builds (and then reuses) its own plan.
    _ext._C.conv2d_reset_stats()
    x, w, b, r = _inputs(
        (1, 32, 16, 16, 32, 3), torch.float16, "cuda", torch.channels_last, residual=True
    )
    ref = _ref64(x, w, b, r, 1, (1, 1, 1, 1))
    assert_close(conv2d(x, w, b, residual=r), ref, torch.float16)
    assert ops.plan_stats()["built"] == 1
    outs, errors = [], []

    def work():
        try:
            with torch.no_grad():
                for _ in range(3):
                    outs.append(conv2d(x, w, b, residual=r))
            torch.cuda.synchronize()
        except Exception as exc:  # reported below: an assert in a thread would be lost
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    assert ops.plan_stats()["built"] == 2 and ops.plan_stats()["cached"] == 2
    for out in outs:
        assert_close(out, ref, torch.float16)
    assert ops.fallback_reasons() == []


@pytest.mark.cuda
@pytest.mark.graph_conv
def test_workspace_limit_zero_still_gives_the_right_result(monkeypatch):
    # With no workspace allowed, cuDNN either finds an engine that needs none or refuses the
    # graph (then the ladder says so): never an out-of-memory error, never a wrong result.
    monkeypatch.setenv("SDVAE_CONV_WORKSPACE_LIMIT", "0")
    _ext._C.conv2d_reset_stats()
    x, w, b, r = _inputs(
        (2, 64, 40, 40, 64, 3), torch.float16, "cuda", torch.channels_last, residual=True
    )
    out = conv2d(x, w, b, residual=r)
    assert_close(out, _ref64(x, w, b, r, 1, (1, 1, 1, 1)), torch.float16)
    for reason in ops.fallback_reasons():
        assert "workspace" in reason.lower() or "No execution plans" in reason, reason


@pytest.mark.cuda
@pytest.mark.serial
@pytest.mark.graph_conv
@torch.no_grad()
def test_batch_over_2_31_elements_is_split():
    # 4 x 8 x 8192^2 = 2^31 elements in and out (fp16, 4 GiB each): cuDNN indexes in 32 bits,
    # so the batch runs as two chunks of 2 (one plan), each under 2^31 elements.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 24 GiB of GPU memory")
    _ext._C.conv2d_reset_stats()
    x = torch.randn(4, 8, 8192, 8192, device="cuda", dtype=torch.float16)
    w = (torch.randn(8, 8, 3, 3, device="cuda") / 72**0.5).to(torch.float16)
    b = torch.randn(8, device="cuda", dtype=torch.float16)
    assert x.numel() == 2**31
    out = conv2d(x, w, b)
    assert ops.fallback_reasons() == []
    assert ops.plan_stats()["built"] == 1  # both chunks have the same shape
    for i in (0, 3):  # one sample from each chunk, against float64
        ref = conv2d_reference(x[i : i + 1].double(), w.double(), b.double())
        assert_close(out[i : i + 1], ref, torch.float16, name=f"sample {i}")
        del ref
