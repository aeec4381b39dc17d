"""Build sdvae and its extension ``sdvae._C``.

``csrc/*.cpp`` (operator schemas and CPU kernels) always; ``csrc/cuda/*.cu`` whenever the
installed torch is a CUDA build and nvcc is found. No GPU is needed to build: with none
visible, the architectures default to 8.0 and 9.0 (override with TORCH_CUDA_ARCH_LIST).
The extension is built against the torch already installed, so install with
``pip install --no-build-isolation``.

The cuDNN graph convolution (``csrc/cuda/*.cpp``, host code only) is added to a CUDA build when
cudnn-frontend's header-only C++ API is found (the ``nvidia-cudnn-frontend`` wheel puts it in
``<site-packages>/include``; ``CUDNN_FRONTEND_INCLUDE`` overrides) together with ``cudnn.h`` and
``libcudnn.so.9`` of the cuDNN that torch uses (the ``nvidia-cudnn-cu1x`` wheel; ``CUDNN_HOME``
or the CUDA toolkit folder otherwise). Without them the build goes on without the graph conv,
says why, and ``sdvae.ops.conv2d`` on CUDA then runs eager with that reason recorded.
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


def _site_dirs():
    import site

    dirs = list(sys.path) + site.getsitepackages()
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def _find_cudnn_frontend():
    """Return (include_dir, reason_if_none): the folder holding cudnn_frontend.h."""
    env = os.environ.get("CUDNN_FRONTEND_INCLUDE")
    cands = [env] if env else []
    try:  # the wheel's own record of where its headers went (works with --target installs)
        from importlib import metadata

        dist = metadata.distribution("nvidia-cudnn-frontend")
        for f in dist.files or ():
            if str(f).replace("\\", "/").endswith("include/cudnn_frontend.h"):
                cands.append(os.path.dirname(str(dist.locate_file(f))))
    except Exception:  # not installed: fall through to the folders below
        pass
    cands += [os.path.join(d, "include") for d in _site_dirs()]
    cands.append(os.path.join(os.path.dirname(torch.__file__), "include"))
    for cand in cands:
        if cand and os.path.isfile(os.path.join(cand, "cudnn_frontend.h")):
            return os.path.abspath(cand), None
    return None, (
        "cudnn_frontend.h not found (pip install nvidia-cudnn-frontend, or set "
        "CUDNN_FRONTEND_INCLUDE)"
    )


def _find_cudnn(cuda_home):
    """Return (include_dir, library_path, reason_if_none) for cudnn.h and libcudnn.so.9."""
    roots = [os.environ["CUDNN_HOME"]] if os.environ.get("CUDNN_HOME") else []
    roots += [os.path.join(d, "nvidia", "cudnn") for d in _site_dirs()]
    roots += [os.path.join(d, "nvidia", "cu13") for d in _site_dirs()]
    roots.append(cuda_home)
    for root in roots:
        inc = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(inc, "cudnn.h")):
            continue
        for libdir in ("lib", "lib64", os.path.join("lib", "x86_64-linux-gnu")):
            libs = sorted(glob.glob(os.path.join(root, libdir, "libcudnn.so*")))
            if libs:
                return inc, libs[0], None
    return None, None, "cudnn.h and libcudnn.so not found (the nvidia-cudnn wheel torch uses)"


def _find_nvrtc(cuda_home):
    """(include dir, library or None) of NVRTC: cudnn-frontend's headers include nvrtc.h, and
    its (unused) runtime-compiled engines reference NVRTC functions, which torch's CUDA build has
    loaded already; linking the same library makes that dependency explicit."""
    roots = [os.path.join(d, "nvidia", n) for d in _site_dirs() for n in ("cu13", "cuda_nvrtc")]
    for root in roots + [cuda_home]:
        if os.path.isfile(os.path.join(root, "include", "nvrtc.h")):
            for libdir in ("lib", "lib64"):
                libs = sorted(glob.glob(os.path.join(root, libdir, "libnvrtc.so*")))
                if libs:
                    return os.path.join(root, "include"), libs[0]
            return os.path.join(root, "include"), None
    return None, None


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
    macros = [("SDVAE_WITH_CUDA", None)]
    include_dirs, link_args = [], []
    fe_inc, fe_reason = _find_cudnn_frontend()
    cudnn_inc, cudnn_lib, cudnn_reason = _find_cudnn(cuda_home)
    nvrtc_inc, nvrtc_lib = _find_nvrtc(cuda_home)
    if fe_inc and cudnn_inc and not nvrtc_inc:
        fe_inc, fe_reason = None, "nvrtc.h not found (cudnn-frontend's headers include it)"
    if fe_inc and cudnn_inc:
        # cudnn.h first: the frontend must see the cuDNN that torch loads at run time.
        include_dirs = [cudnn_inc, fe_inc]
        # Link the very library torch uses (DT_NEEDED libcudnn.so.9, found already loaded).
        link_args = [cudnn_lib]
        if nvrtc_inc and nvrtc_inc != os.path.join(cuda_home, "include"):
            include_dirs.append(nvrtc_inc)
        if nvrtc_lib:
            link_args.append(nvrtc_lib)
        macros.append(("SDVAE_WITH_CUDNN_FE", None))
        cu += sorted(
            os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cpp"))
        )
        print(
            f"sdvae: cuDNN graph conv with cudnn-frontend from {fe_inc}, cuDNN {cudnn_lib}",
            file=sys.stderr,
        )
    else:
        print(
            "sdvae: building WITHOUT the cuDNN graph conv (sdvae.ops.conv2d on CUDA will run "
            f"eager and say so): {fe_reason or cudnn_reason}",
            file=sys.stderr,
        )
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
        include_dirs=include_dirs,
        extra_link_args=link_args,
        define_macros=macros,
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
