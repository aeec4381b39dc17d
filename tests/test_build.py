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
    if torch.version.cuda is not None and not _ext.with_cuda():
        # A CUDA torch with a CPU-only extension: the build says why (setup.py's reason).
        assert "CPU only (" in info, info
    if torch.version.cuda is not None and _ext.with_cuda():
        assert "sm" in info
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # setup.py's default without a GPU (with one, torch builds for the GPU present).
            assert _built_archs() == {"sm_80", "sm_90"}, info


def _setup_module():
    """setup.py's functions (its setup() call only runs as __main__, the way pip runs it)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    spec = importlib.util.spec_from_file_location("sdvae_setup_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _releases(table):
    from packaging.version import Version

    return lambda home: Version(table[home]) if table.get(home) else None


def test_toolkit_matching_torch_is_preferred():
    # Several toolkits: the first (in preference order) with torch's CUDA major version wins,
    # even over an explicit CUDA_HOME of another major version (torch would refuse that one).
    st = _setup_module()
    releases = _releases({"/env/cuda": "12.4", "/usr/local/cuda-13.0": "13.0", "/x": "13.2"})
    home, reason = st.select_toolkit("13.0", ["/env/cuda", "/usr/local/cuda-13.0", "/x"], releases)
    assert (home, reason) == ("/usr/local/cuda-13.0", None)
    # Same major, another minor: fine for torch (it only warns), the first one is taken.
    assert st.select_toolkit("13.0", ["/x", "/usr/local/cuda-13.0"], releases)[0] == "/x"
    assert st.select_toolkit("12.8", ["/usr/local/cuda-13.0", "/env/cuda"], releases) == (
        "/env/cuda",
        None,
    )


@pytest.mark.parametrize(
    "torch_cuda, cands, table, words",
    [
        (
            "13.0",
            ["/opt/cuda-12.4"],
            {"/opt/cuda-12.4": "12.4"},
            ["13.0", "/opt/cuda-12.4", "12.4"],
        ),
        ("13.0", ["/opt/broken"], {}, ["/opt/broken (CUDA unknown)"]),
        ("13.0", [], {}, ["no CUDA toolkit found"]),
        (None, ["/usr/local/cuda-13.0"], {"/usr/local/cuda-13.0": "13.0"}, ["CPU-only build"]),
    ],
)
def test_no_matching_toolkit_says_why(torch_cuda, cands, table, words):
    st = _setup_module()
    home, reason = st.select_toolkit(torch_cuda, cands, _releases(table))
    assert home is None
    for w in words:
        assert w in reason, reason


def test_mismatched_toolkit_builds_the_cpu_extension_with_the_reason(monkeypatch, tmp_path):
    # Only a CUDA 12 toolkit, torch built with CUDA 13: torch's own check would make the
    # install fail. Instead the CPU extension is built, and the reason compiled into it
    # (build_info(), which `sdvae check` prints).
    st = _setup_module()
    monkeypatch.delenv("SDVAE_NO_CUDA", raising=False)
    monkeypatch.setattr(st.torch.version, "cuda", "13.0")
    monkeypatch.setattr(st, "_toolkit_candidates", lambda: ["/opt/cuda-12.4"])
    monkeypatch.setattr(st, "_nvcc_release", _releases({"/opt/cuda-12.4": "12.4"}))
    ext = st._extension(generated_dir=str(tmp_path))
    assert ext.name == "sdvae._C"
    assert not any(src.endswith(".cu") for src in ext.sources), ext.sources
    assert not any(name == "SDVAE_WITH_CUDA" for name, _ in (ext.define_macros or []))
    assert str(tmp_path) in ext.include_dirs
    header = (tmp_path / "sdvae_build_config.h").read_text()
    assert "#define SDVAE_CPU_ONLY_REASON" in header
    assert "/opt/cuda-12.4 (CUDA 12.4)" in header and "torch's CUDA 13.0" in header


def test_build_config_header_is_a_valid_c_string(tmp_path):
    st = _setup_module()
    reason = 'a "quoted" path\\to\\cuda and caf\u00e9\nnew line'
    text = open(st.write_build_config(str(tmp_path), reason)).read()
    line = [ln for ln in text.splitlines() if ln.startswith("#define SDVAE_CPU_ONLY_REASON")][0]
    literal = line.split(" ", 2)[2]
    assert literal.startswith('"') and literal.endswith('"') and "\n" not in literal[1:-1]
    # Decoded as C would: the same bytes.
    assert literal[1:-1].encode().decode("unicode_escape").encode("latin-1") == reason.encode()
    empty = open(st.write_build_config(str(tmp_path), "")).read()
    assert '#define SDVAE_CPU_ONLY_REASON ""' in empty


def test_extension_is_built_with_cuda_when_torch_and_nvcc_allow():
    import shutil

    if (
        torch.version.cuda is None
        or shutil.which("nvcc") is None
        or os.environ.get("SDVAE_NO_CUDA")
    ):
        pytest.skip("CPU-only torch or no nvcc: the CUDA sources are skipped by design")
    st = _setup_module()
    home, reason = st._find_cuda_home()
    if home is None:  # e.g. torch 2.6's CUDA 12.4 beside a CUDA 13 toolkit
        assert not _ext.with_cuda() and reason in _ext.build_info(), _ext.build_info()
        pytest.skip(f"no toolkit matches torch's CUDA, so the CPU extension was built: {reason}")
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


def test_cuda_code_is_in_the_binary_for_sm80_and_sm90():
    import subprocess

    if not _ext.with_cuda():
        pytest.skip(f"the extension has no CUDA kernels ({_ext.build_info()})")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's NVIDIA backend) to read the binary")
    archs = _built_archs()
    assert archs, _ext.build_info()
    elves = subprocess.run(
        [tool, "--list-elf", _ext._C.__file__], capture_output=True, text=True, check=True
    )
    for arch in archs:
        assert f"build_info.{arch}.cubin" in elves.stdout, elves.stdout


def _elf(tool, *args):
    """Output of binutils' ``tool`` (nm, readelf) on sdvae._C."""
    import shutil
    import subprocess

    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"no {tool} (binutils) to read the binary")
    return subprocess.run(
        [path, *args, _ext._C.__file__], capture_output=True, text=True, check=True
    ).stdout


def test_graph_conv_is_built_when_cudnn_frontend_is_installed():
    # A CUDA build with the nvidia-cudnn-frontend wheel installed (make install puts it in) must
    # compile the cuDNN graph conv; without the wheel the build says why and conv2d runs eager.
    from importlib import metadata

    if not _ext.with_cuda():
        pytest.skip(f"the extension has no CUDA kernels ({_ext.build_info()})")
    try:
        metadata.distribution("nvidia-cudnn-frontend")
    except metadata.PackageNotFoundError:
        pytest.skip("nvidia-cudnn-frontend is not installed")
    assert _ext._C.graph_conv_available(), _ext.build_info()
    assert "graph conv: cudnn-frontend 1." in _ext.build_info()


def test_graph_conv_objects_are_in_the_binary():
    # The graph conv's host code is linked in and calls cuDNN's backend API through the very
    # libcudnn.so.9 torch loads (linked by SONAME, no second copy of cuDNN).
    if not (_ext.with_cuda() and _ext._C.graph_conv_available()):
        pytest.skip(f"no cuDNN graph conv in this build ({_ext.build_info()})")
    defined = _elf("nm", "-D", "--defined-only", "-C")
    assert "sdvae::graph_conv2d_cuda(" in defined
    undefined = _elf("nm", "-D", "--undefined-only")
    for sym in ("cudnnBackendExecute", "cudnnBackendFinalize", "cudnnSetStream"):
        assert sym in undefined, sym
    needed = _elf("readelf", "-d")
    assert "[libcudnn.so.9]" in needed, needed


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
