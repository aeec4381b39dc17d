"""Build sdvae and its extension ``sdvae._C``.

``csrc/*.cpp`` (operator schemas and CPU kernels) always; ``csrc/cuda/*.cu`` whenever the
installed torch is a CUDA build and nvcc is found. No GPU is needed to build: with none
visible, the architectures default to 8.0 and 9.0 (override with TORCH_CUDA_ARCH_LIST).
The extension is built against the torch already installed, so install with
``pip install --no-build-isolation``.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the build needs torch first
    sys.exit(
        "sdvae builds its extension against the installed torch: install torch>=2.6 first, "
        "then `pip install --no-build-isolation .`"
    )


def _find_cuda_home():
    """Return (cuda_home, reason_if_none)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return home, None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc was not found on PATH and CUDA_HOME is not set"
    # The nvcc on PATH may be a wrapper script: prefer a real toolkit folder beside it.
    for cand in [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] + sorted(
        glob.glob("/usr/local/cuda*"), reverse=True
    ):
        if os.path.isdir(os.path.join(cand, "include")) and os.path.isfile(
            os.path.join(cand, "bin", "nvcc")
        ):
            with open(os.path.join(cand, "bin", "nvcc"), "rb") as f:
                if f.read(2) != b"#!":
                    return cand, None
    return None, f"found {nvcc}, but no CUDA toolkit folder (set CUDA_HOME)"


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cu = sorted(
        os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu"))
    )
    cxx_flags = ["-O3"]  # torch picks the C++ standard its headers need
    if os.environ.get("SDVAE_NO_CUDA"):
        cuda_home, reason = None, "SDVAE_NO_CUDA is set"
    elif not cu:
        cuda_home, reason = None, "csrc/cuda/ holds no .cu sources"
    else:
        cuda_home, reason = _find_cuda_home()
    if cuda_home is None:
        print(f"sdvae: building the CPU extension only ({reason})", file=sys.stderr)
        return cpp_extension.CppExtension("sdvae._C", cpp, extra_compile_args={"cxx": cxx_flags})
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(
        f"sdvae: building CPU + CUDA extension with {cuda_home} for "
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPU')}",
        file=sys.stderr,
    )
    return cpp_extension.CUDAExtension(
        "sdvae._C",
        cpp + cu,
        define_macros=[("SDVAE_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )


setup(
    packages=["sdvae", "sdvae.bench", "sdvae.kernels"],
    package_dir={"sdvae": "sdvae", "sdvae.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
