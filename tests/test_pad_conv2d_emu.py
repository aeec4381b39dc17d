"""The CUDA kernels of pad_conv2d, run on the CPU through a host emulation of CUDA.

``csrc/cuda/pad_conv2d_kernels.cuh`` is compiled unchanged as host C++ against
``tests/cuda_emu/cuda_emu.h`` (one std::thread per CUDA thread, real barriers, cp.async queued
until its wait_group, warp-level WMMA with the documented alignment checks). The launch is
prepared by the same host code as the real one (``prepare_launch``), so these tests cover the
path choice, the implicit-GEMM indexing, the padding predicates, the cp.async pipeline, the
epilogue and the fp32 direct kernel; they say nothing about speed, and they are no substitute
for ``tests/test_pad_conv2d.py`` on a GPU (the ``cuda`` cases), which runs the real thing.

Buffers are surrounded by guards: NaN around the input (a stray plain load shows up in the
result), a sentinel around the output (a stray store is caught), NaN inside the output (a
missed store is caught). The last tests plant bugs in a copy of the kernel source and check the
emulator catches each one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
KERNELS = ROOT / "csrc" / "cuda" / "pad_conv2d_kernels.cuh"
GUARD = 64  # elements of guard on each side; a multiple of 8 keeps 16-byte alignment
SENTINEL = 77.0
DEFAULT_STAGES = 3  # kDefaultStages in the kernel header


def _cuda_include():
    """The CUDA toolkit's include folder (for cuda_fp16.h / cuda_bf16.h), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_bf16.h")):
            return os.path.join(c, "include")
    return None


def _build(namespace: str, kernel_dir: Path):
    """Build the emulator against the kernel header in ``kernel_dir`` with its ops under
    ``torch.ops.<namespace>``; cached by content."""
    from torch.utils import cpp_extension

    inc = _cuda_include()
    if inc is None:
        pytest.skip("the CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h) were not found")
    venv_bin = os.path.dirname(sys.executable)  # the ninja `pip install ninja` put beside python
    if shutil.which("ninja") is None and os.path.exists(os.path.join(venv_bin, "ninja")):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    files = [EMU / "pad_conv2d_emu.cpp", EMU / "cuda_emu.h", kernel_dir / KERNELS.name]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files) + torch.__version__.encode())
    full = f"{namespace}_{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("SDVAE_EMU_CACHE", Path.home() / ".cache" / "sdvae_cuda_emu"))
    try:
        (root / full).mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: build in the temp folder
        root = Path(tempfile.gettempdir()) / "sdvae_cuda_emu"
        (root / full).mkdir(parents=True, exist_ok=True)
    build = root / full
    lock = build / "lock"  # torch's build lock; a build killed mid-way leaves it behind
    if lock.exists() and time.time() - lock.stat().st_mtime > 600:
        lock.unlink()
    cpp_extension.load(
        name=full,
        sources=[str(EMU / "pad_conv2d_emu.cpp")],
        extra_include_paths=[str(kernel_dir), str(EMU), inc],
        extra_cflags=[
            "-O2",
            "-DSDVAE_CUDA_EMU",
            f"-DSDVAE_EMU_NS={namespace}",
            "-Wno-unknown-pragmas",
        ],
        extra_ldflags=["-pthread"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, namespace)


@pytest.fixture(scope="module")
def emu():
    return _build("sdvae_cuda_emu", KERNELS.parent)


def _guarded(n, c, h, w, dtype, fmt, fill, interior=None, shift=0):
    """An (n, c, h, w) tensor in ``fmt`` inside a flat buffer of ``fill`` with GUARD elements
    either side; ``shift`` moves it off 16-byte alignment. Returns (view, buffer)."""
    numel = n * c * h * w
    buf = torch.full((numel + 2 * GUARD + shift,), fill, dtype=dtype)
    if fmt == "nhwc":
        strides = (h * w * c, 1, w * c, c)
    else:
        strides = (c * h * w, h * w, w, 1)
    view = buf.as_strided((n, c, h, w), strides, GUARD + shift)
    if interior is not None:
        view.copy_(interior)
    return view, buf


def emulate(ops, x, wt, b, stride, padding, fmt, shift=0, stages=0):
    """Run the CUDA launch path on the emulator (``stages`` 0: the default pipeline depth).
    Returns (out, path); fails on any error the emulator recorded, on any store outside the
    output, and on a tile kernel run at another depth than asked."""
    n, c, h, w = x.shape
    cout, _, kh, kw = wt.shape
    left, right, top, bottom = padding
    oh = (h + top + bottom - kh) // stride + 1
    ow = (w + left + right - kw) // stride + 1
    xg, _ = _guarded(n, c, h, w, x.dtype, fmt, float("nan"), interior=x, shift=shift)
    out, obuf = _guarded(n, cout, oh, ow, x.dtype, fmt, SENTINEL)
    out.fill_(float("nan"))
    res = ops.pad_conv2d(xg, wt, b, out, stride, left, top, stages)
    path, _, errors = res.partition(": ")
    assert not errors, f"emulator: {errors}"
    if path.startswith("tensor_core"):
        path, depth, store = path.split("/")
        assert depth == f"{stages or DEFAULT_STAGES}stages", depth
        # 16-byte stores exactly when 8 channels of a pixel are contiguous and aligned.
        vec_store = fmt == "nhwc" or oh * ow == 1
        assert store == ("store16" if vec_store and cout % 8 == 0 else "store2"), store
    guards = torch.cat([obuf[:GUARD], obuf[-GUARD:]])
    assert (guards == SENTINEL).all(), "the kernel stored outside its output"
    return out, path


def _kernel_hw(k):
    return (k, k) if isinstance(k, int) else k


def _inputs(shape, dtype, with_bias=True, seed=0):
    n, c, h, w, cout, k = shape
    kh, kw = _kernel_hw(k)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) + 0.3).to(dtype)
    wt = (torch.randn(cout, c, kh, kw, generator=g) / (c * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if with_bias else None
    return x, wt, b


def _ref64(x, wt, b, stride, padding):
    b64 = None if b is None else b.double()
    return F.conv2d(F.pad(x.double(), padding), wt.double(), b64, stride=stride)


def assert_within_rounding(out, x, wt, b, stride, padding):
    """Every element, not just the tensor's relative error: the kernels multiply exactly (16-bit
    inputs) or with fp32 FMAs and accumulate in fp32, then round once to out.dtype. So each
    element lies within K * 2^-24 * sum|x*w| (fp32 accumulation, generously) plus one unit in
    the last place of out.dtype (the final rounding, allowing a binade change) of the float64
    result."""
    ref = _ref64(x, wt, b, stride, padding)
    absb = None if b is None else b.double().abs()
    mag = F.conv2d(F.pad(x.double().abs(), padding), wt.double().abs(), absb, stride=stride)
    k = wt.shape[1] * wt.shape[2] * wt.shape[3]
    acc_err = (k + 2) * 2.0**-24 * mag
    if out.dtype == torch.float32:
        bound = acc_err + 2.0**-24 * ref.abs()
    else:
        eps = torch.finfo(out.dtype).eps  # ulp of 1.0
        tiny = torch.finfo(out.dtype).smallest_normal
        binade = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(tiny))))
        bound = acc_err + eps * binade + eps * tiny
    err = (out.double() - ref).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    assert not bad.any(), (
        f"{int(bad.sum())} of {out.numel()} elements outside the rounding bound; first at "
        f"{tuple(int(i) for i in bad.nonzero()[0])}: error {err[bad][0]:.3g} > {bound[bad][0]:.3g}"
    )


def _expected_path(dtype, fmt, x, shift=0, out=None):
    if dtype == torch.float32:
        # Outputs are enumerated channel-fastest when the output's channel stride is 1: NHWC,
        # or NCHW with a 1x1 output, where the two orders are the same.
        one_pixel = out is not None and out.shape[2] * out.shape[3] == 1 and out.shape[1] > 1
        return "f32_direct_nhwc" if fmt == "nhwc" or one_pixel else "f32_direct_nchw"
    # The vector path needs channels at stride 1: NHWC, or NCHW with a 1x1 input.
    channels_inner = fmt == "nhwc" or x.shape[2] * x.shape[3] == 1
    vec = channels_inner and x.shape[1] % 8 == 0 and shift == 0
    return "tensor_core_vec" if vec else "tensor_core_scalar"


# (N, C, H, W, Cout, K), chosen against the tile kernel's edges: K = KH*KW*C below, at and
# above one 32-wide K step and not a multiple of it; M = N*OH*OW under one 128-row block and
# over several; Cout under 128 and over it (partial second and third column blocks); C % 8 == 0
# (the vector path, one 8-channel chunk per tap at C = 8) and not; 1x1, 3x3, 4x4 and
# non-square (KH, KW) kernels, so that rows and columns cannot be swapped unnoticed; a 1x1 input.
SHAPES = [
    (1, 3, 8, 8, 4, 3),
    (2, 5, 7, 9, 6, 3),
    (2, 8, 9, 7, 16, 4),
    (1, 16, 2, 2, 8, 3),
    (1, 24, 11, 6, 200, 1),
    (3, 8, 13, 12, 24, 3),
    (1, 32, 10, 19, 136, 3),
    (2, 8, 9, 11, 300, (1, 3)),
    (1, 16, 12, 7, 24, (3, 1)),
    (2, 5, 8, 10, 7, (2, 3)),
    (2, 16, 1, 1, 8, 1),
]
PADDINGS = [(0, 1, 0, 1), (0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 3, 1), (5, 4, 0, 6)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_float64_reference(emu, shape, stride, padding, fmt, dtype):
    n, c, h, w, cout, k = shape
    kh, kw = _kernel_hw(k)
    if h + padding[2] + padding[3] < kh or w + padding[0] + padding[1] < kw:
        pytest.skip("the padded input is smaller than the kernel (the op refuses it)")
    x, wt, b = _inputs(shape, dtype, with_bias=stride != 3)
    out, path = emulate(emu, x, wt, b, stride, padding, fmt)
    assert path == _expected_path(dtype, fmt, x, out=out)
    assert_close(out, _ref64(x, wt, b, stride, padding), dtype, name=f"{path} {shape} s{stride}")
    assert_within_rounding(out, x, wt, b, stride, padding)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("size", [32, 33])
def test_encoder_downsample(emu, size, fmt, dtype):
    # The encoder's downsample (3x3, stride 2, pad (0, 1, 0, 1), Cin = Cout) at a small size:
    # 64 channels in NHWC take the cp.async vector path, the first-class case; several blocks.
    x, wt, b = _inputs((2, 64, size, size, 64, 3), dtype)
    out, path = emulate(emu, x, wt, b, 2, (0, 1, 0, 1), fmt)
    assert path == _expected_path(dtype, fmt, x)
    assert_close(out, _ref64(x, wt, b, 2, (0, 1, 0, 1)), dtype, name=path)
    assert_within_rounding(out, x, wt, b, 2, (0, 1, 0, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_misaligned_input_takes_the_scalar_path(emu, dtype):
    x, wt, b = _inputs((1, 16, 9, 9, 16, 3), dtype)
    out, path = emulate(emu, x, wt, b, 2, (0, 1, 0, 1), "nhwc", shift=1)
    assert path == "tensor_core_scalar"
    assert_close(out, _ref64(x, wt, b, 2, (0, 1, 0, 1)), dtype, name=path)
    assert_within_rounding(out, x, wt, b, 2, (0, 1, 0, 1))


def test_default_depth_matches_the_header():
    assert f"kDefaultStages = {DEFAULT_STAGES};" in KERNELS.read_text()


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((2, 64, 16, 16, 64, 3), "nhwc"),  # vector path, 18 K steps
        ((1, 24, 11, 9, 136, 3), "nhwc"),  # vector path, K tail (216 = 6.75 steps), 2 col blocks
        ((1, 8, 5, 5, 16, 1), "nhwc"),  # a single K step: fewer steps than stages
        ((2, 5, 7, 9, 6, 3), "nchw"),  # scalar path
    ],
)
def test_every_pipeline_depth(emu, shape, fmt, stages):
    x, wt, b = _inputs(shape, torch.bfloat16)
    out, path = emulate(emu, x, wt, b, 2, (0, 1, 0, 1), fmt, stages=stages)
    assert path == _expected_path(torch.bfloat16, fmt, x)
    assert_within_rounding(out, x, wt, b, 2, (0, 1, 0, 1))


def test_pipeline_depth_from_the_environment(emu, monkeypatch):
    # stages=0 takes SDVAE_PAD_CONV2D_STAGES (the benchmark's knob), as the real launcher does.
    x, wt, b = _inputs((1, 8, 5, 5, 8, 3), torch.float16)
    out = torch.empty(1, 8, 2, 2, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    xl = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("SDVAE_PAD_CONV2D_STAGES", "2")
    assert emu.pad_conv2d(xl, wt, b, out, 2, 0, 0, 0) == "tensor_core_vec/2stages/store16"
    for bad in ["7", "3x", "three"]:
        monkeypatch.setenv("SDVAE_PAD_CONV2D_STAGES", bad)
        with pytest.raises(RuntimeError, match=f"SDVAE_PAD_CONV2D_STAGES.*got {bad}"):
            emu.pad_conv2d(xl, wt, b, out, 2, 0, 0, 0)


def test_pipeline_depth_is_checked(emu):
    x, wt, b = _inputs((1, 8, 5, 5, 8, 3), torch.float16)
    with pytest.raises(RuntimeError, match="must be 2, 3 or 4"):
        emulate(emu, x, wt, b, 2, (0, 1, 0, 1), "nhwc", stages=5)


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_accumulates_in_fp32_and_rounds_once(emu, fmt):
    # fp16 partial sums far beyond the fp16 range (65504) that cancel to 512: 4 taps of
    # +256*32 per channel, 4 of -256*32, one of 256*0.125, over 16 channels, plus a bias of
    # 0.3. Accumulating in fp16 (or storing a partial sum in fp16) gives inf or garbage; fp32
    # accumulation gives exactly 512, and 512 + 0.3 rounds once to 512.5 in fp16.
    x = torch.full((1, 16, 3, 3), 256.0, dtype=torch.float16)
    taps = torch.tensor([32.0] * 4 + [-32.0] * 4 + [0.125]).reshape(1, 1, 3, 3)
    wt = taps.expand(8, 16, 3, 3).to(torch.float16).contiguous()
    b = torch.full((8,), 0.3, dtype=torch.float16)
    out, path = emulate(emu, x, wt, b, 1, (0, 0, 0, 0), fmt)
    assert path == _expected_path(torch.float16, fmt, x)
    assert out.shape == (1, 8, 1, 1)
    assert torch.equal(out, torch.full_like(out, 512.5)), out.flatten().tolist()


# ---- the emulator catches planted bugs ---------------------------------------------------------
# Each mutant edits one line of a copy of the kernel header so that it misbehaves only when
# cuda_emu::mutant() selects it; the unmutated path must still pass in the same build.
MUTANTS = {
    1: (
        "    cp_async_wait<STAGES - 2>();\n",
        "    if (cuda_emu::mutant() == 1) cp_async_wait<STAGES - 1>(); "
        "else cp_async_wait<STAGES - 2>();\n",
    ),
    2: (
        "ih < p.H && iw >= 0 && iw < p.W;",
        "ih < p.H && iw >= 0 && (cuda_emu::mutant() == 2 ? iw <= p.W : iw < p.W);",
    ),
    3: (
        "if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {\n            v = x",
        "if (ih >= 0 && (cuda_emu::mutant() == 3 ? ih <= p.H : ih < p.H) && iw >= 0 && "
        "iw < p.W) {\n            v = x",
    ),
    4: (
        "cp_async_16(as + row * kLds + kc, src, ok ? 16 : 0);",
        "if (cuda_emu::mutant() != 4 || ok) cp_async_16(as + row * kLds + kc, src, ok ? 16 : 0);",
    ),
    5: (
        "    __syncthreads();\n    const int next = kt + STAGES - 1;",
        "    if (cuda_emu::mutant() != 5) __syncthreads();\n    const int next = kt + STAGES - 1;",
    ),
    6: (
        "wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);\n"
        "      __syncwarp();",
        "wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);\n"
        "      if (cuda_emu::mutant() != 6) __syncwarp();",
    ),
}
# Mutants 5 and 6 are races: whether one shows depends on how the threads are scheduled, so
# they get several tries (and the test asks that at least one catches the bug).
RACY = {5, 6}


@pytest.fixture(scope="module")
def mutant_emu(emu, tmp_path_factory):
    src = KERNELS.read_text()
    for m, (old, new) in MUTANTS.items():
        assert src.count(old) == 1, f"mutant {m}: the kernel line it edits changed: {old!r}"
        src = src.replace(old, new)
    d = tmp_path_factory.mktemp("mutant")
    (d / KERNELS.name).write_text(src)
    return _build("sdvae_cuda_emu_mutant", d)


@pytest.mark.parametrize(
    "mutant, fmt, padding",
    [
        (0, "nhwc", (0, 1, 0, 1)),  # control: the unmutated kernel in the mutant build
        (1, "nhwc", (0, 1, 0, 1)),  # reads a pipeline stage before its cp.async landed
        (2, "nhwc", (0, 1, 0, 1)),  # vector path reads one column into the right padding
        (3, "nchw", (0, 1, 0, 1)),  # scalar path reads one row into the bottom padding
        (4, "nhwc", (0, 1, 0, 1)),  # vector path skips the copy (zero fill) for padding taps
        (5, "nhwc", (0, 1, 0, 1)),  # no barrier between the pipeline's loads and its reads
        (6, "nhwc", (0, 1, 0, 1)),  # lanes read the epilogue scratch before the store lands
    ],
)
def test_emulator_catches_planted_bugs(mutant_emu, mutant, fmt, padding):
    x, wt, b = _inputs((2, 64, 16, 16, 64, 3), torch.float16)
    outcomes = []
    for _ in range(5 if mutant in RACY else 1):
        mutant_emu.set_mutant(mutant)
        try:
            out, path = emulate(mutant_emu, x, wt, b, 2, padding, fmt)
        except AssertionError as e:  # an emulator error (bad cp.async) or a stray store
            assert mutant != 0, f"the unmutated kernel failed in the mutant build: {e}"
            return
        finally:
            mutant_emu.set_mutant(0)
        err = (out.double() - _ref64(x, wt, b, 2, padding)).abs().max().item()
        if mutant == 0:
            assert path == _expected_path(torch.float16, fmt, x) and err < 0.05, (path, err)
            return
        if not err < 0.1:  # a large error or NaN: caught
            return
        outcomes.append(f"{path}: max abs error {err:.3g}")
    pytest.fail(f"mutant {mutant} went unnoticed: {outcomes}")
