"""The package layout, the extension build and the test helpers themselves."""

import importlib
import os
import sys

import pytest
import torch
import triton
import triton.language as tl
from conftest import aot_compile, assert_close

import sdvae
from sdvae import _ext


def test_kernels_is_a_subpackage_not_a_top_level_package():
    k = importlib.import_module("sdvae.kernels")
    assert k.__name__ == "sdvae.kernels"
    assert os.path.basename(os.path.dirname(k.__file__)) == "kernels"
    # The unrelated top-level `kernels` package (which diffusers probes for) is not ours.
    top = sys.modules.get("kernels")
    assert top is None or not os.path.samefile(
        os.path.dirname(top.__file__), os.path.dirname(k.__file__)
    )


def _built_archs():
    """The architectures sdvae._C's CUDA code was compiled for, e.g. {"sm_80", "sm_90"}, from
    build_info() ("... CUDA 13.0 for sm 800,900")."""
    import re

    m = re.search(r"for sm ([\d,]+)", _ext.build_info())
    return {f"sm_{int(a) // 10}" for a in m.group(1).split(",")} if m else set()


def test_extension_loads_and_reports_its_build():
    assert _ext.available(), _ext.LOAD_ERROR
    info = _ext.build_info()
    assert info.startswith("torch ")
    if torch.version.cuda is not None and _ext.with_cuda():
        assert "sm" in info
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # setup.py's default without a GPU (with one, torch builds for the GPU present).
            assert _built_archs() == {"sm_80", "sm_90"}, info


def test_extension_is_built_with_cuda_when_torch_and_nvcc_allow():
    import shutil

    if (
        torch.version.cuda is None
        or shutil.which("nvcc") is None
        or os.environ.get("SDVAE_NO_CUDA")
    ):
        pytest.skip("CPU-only torch or no nvcc: the CUDA sources are skipped by design")
    assert _ext.with_cuda(), _ext.build_info()


def _cuobjdump():
    import glob
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    # Triton's NVIDIA backend ships one; the toolkit on this kind of machine may not.
    here = os.path.dirname(triton.__file__)
    cands = glob.glob(os.path.join(here, "backends", "nvidia", "bin", "cuobjdump"))
    return cands[0] if cands else None


def test_cuda_kernels_are_in_the_binary_for_sm80_and_sm90_without_spills():
    import re
    import subprocess

    if not _ext.with_cuda():
        pytest.skip(f"the extension has no CUDA kernels ({_ext.build_info()})")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's NVIDIA backend) to read the binary")
    so = _ext._C.__file__
    archs = _built_archs()
    assert archs, _ext.build_info()
    elves = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True)
    for arch in archs:
        assert f"pad_conv2d.{arch}.cubin" in elves.stdout, elves.stdout
    res = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True)
    # "Function <mangled>:\n  REG:n STACK:n SHARED:n LOCAL:n ..." per kernel and architecture.
    found = re.findall(
        r"Function (\S*pad_conv2d_(?:tc|f32)_kernel\S*):\s*\n\s*(REG:.*)", res.stdout
    )
    # 2 dtypes x 2 load paths x 3 pipeline depths tensor-core + 2 fp32 variants, per arch
    assert len(found) == 14 * len(archs), res.stdout
    for name, usage in found:
        fields = dict(f.split(":") for f in usage.split())
        assert int(fields["LOCAL"]) == 0, f"{name} spills to local memory: {usage}"
        assert int(fields["STACK"]) == 0, f"{name} uses a stack: {usage}"
        assert int(fields["SHARED"]) <= 48 * 1024, f"{name}: static shared memory {usage}"
        # 256 threads x REG must leave room for 2 blocks per SM (64K registers).
        assert int(fields["REG"]) <= 128, f"{name}: {usage}"


def test_cuda_kernels_use_tensor_cores_and_cp_async():
    # What the machine code does, per architecture: the fp16/bf16 kernels multiply on tensor
    # cores with fp32 accumulation (HMMA.*.F32), the vector variants load with 16-byte cp.async
    # (LDGSTS.*.128, zero-filling for the padding), and the fp32 kernel stays off the tensor
    # cores (no TF32) with plain FMAs.
    import subprocess

    if not _ext.with_cuda():
        pytest.skip(f"the extension has no CUDA kernels ({_ext.build_info()})")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's NVIDIA backend) to read the binary")
    sass = subprocess.run(
        [tool, "-sass", _ext._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    arch, name, body = None, None, {}
    for line in sass.splitlines():
        if line.startswith("arch = "):  # a new ELF: its functions follow
            arch, name = line.split("=")[1].strip(), None
        elif "Function :" in line:
            name = line.split("Function :")[1].strip()
            body[(arch, name)] = []
        elif name is not None:
            body[(arch, name)].append(line)
    kernels = {k: "\n".join(v) for k, v in body.items() if "pad_conv2d_" in k[1]}
    assert {a for a, _ in kernels} == _built_archs(), sorted(kernels)
    for (arch, name), code in kernels.items():
        if "tc_kernel" in name:
            assert "HMMA.16816.F32" in code, f"{arch} {name}: no fp32-accumulating HMMA"
            if "Lb1E" in name:  # the VEC=true instantiation
                assert "LDGSTS.E.BYPASS.128" in code, f"{arch} {name}: no 16-byte cp.async"
                assert "ZFILL" in code, f"{arch} {name}: no zero-filling cp.async"
        else:
            assert "HMMA" not in code and "FFMA" in code, f"{arch} {name}"


def test_torch_library_namespace_exists():
    assert hasattr(torch.ops, "sdvae")


def test_triton_interpreter_is_on_for_cpu_runs():
    if os.environ.get("SDVAE_TRITON_GPU") == "1":
        pytest.skip("GPU run")
    assert os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 3.0, mask=mask)


def test_interpreter_runs_a_kernel_on_cpu_tensors():
    if os.environ.get("SDVAE_TRITON_GPU") == "1":
        pytest.skip("GPU run")
    x = torch.randn(1000)
    y = torch.empty_like(x)
    _scale_kernel[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
    assert_close(y, x.double() * 3)


def test_aot_helper_compiles_for_sm80_and_sm90():
    res = aot_compile(
        "test_build",
        "_scale_kernel",
        [
            {
                "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
                "constexprs": {"BLOCK": 256},
            }
        ],
    )
    assert sorted(r["cc"] for r in res) == [80, 90]


def test_aot_helper_reports_compile_errors():
    with pytest.raises(AssertionError, match="AOT compile failed"):
        aot_compile(
            "test_build",
            "_scale_kernel",
            [
                {
                    "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
                    "constexprs": {"BLOCK": 100},
                }
            ],
        )


def test_assert_close_catches_nan_and_error():
    ref = torch.randn(100, dtype=torch.float64)
    with pytest.raises(AssertionError, match="NON-FINITE"):
        out = ref.clone()
        out[3] = float("nan")
        assert_close(out, ref, torch.float32)
    with pytest.raises(AssertionError, match=r"at \(7,\)"):
        out = ref.clone()
        out[7] += 1.0
        assert_close(out, ref, torch.float32)


def test_public_api_names():
    for name in ("VAE", "VAEConfig", "load", "from_diffusers"):
        assert hasattr(sdvae, name)
