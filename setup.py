"""Build sdvae and its extension ``sdvae._C``.

``csrc/*.cpp`` (operator schemas and CPU kernels) always; ``csrc/cuda/*.cu`` whenever the
installed torch is a CUDA build and a CUDA toolkit of the same major version as torch's is
found. No GPU is needed to build: with none visible, the architectures default to 8.0 and 9.0
(override with TORCH_CUDA_ARCH_LIST). The extension is built against the torch already
installed, so install with ``pip install --no-build-isolation``.

The toolkit: the first of CUDA_HOME (or CUDA_PATH), the toolkit of the ``nvcc`` on PATH, and
``/usr/local/cuda*`` (newest first) whose nvcc has torch's CUDA major version (torch refuses to
build with another major version). When none has, the CPU extension is built instead, and why
is compiled into it: ``sdvae._ext.build_info()`` and ``sdvae check`` print it (as they print
any other reason for a CPU-only build).

The cuDNN graph convolution (``csrc/cuda/*.cpp``, host code only) is added to a CUDA build when
cudnn-frontend's header-only C++ API is found (the ``nvidia-cudnn-frontend`` wheel puts it in
``<site-packages>/include``; ``CUDNN_FRONTEND_INCLUDE`` overrides) together with ``cudnn.h`` and
``libcudnn.so.9`` of the cuDNN that torch uses (the ``nvidia-cudnn-cu1x`` wheel; ``CUDNN_HOME``
or the CUDA toolkit folder otherwise). Without them the build goes on without the graph conv,
says why, and ``sdvae.ops.conv2d`` on CUDA then runs eager with that reason recorded.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from packaging.version import InvalidVersion, Version
from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the build needs torch first
    sys.exit(
        "sdvae builds its extension against the installed torch: install torch>=2.6 first, "
        "then `pip install --no-build-isolation .`"
    )


def _nvcc_release(home):
    """The CUDA release of ``home``'s nvcc (e.g. Version("13.0")), None when it cannot tell."""
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return Version(m.group(1)) if m else None


def _is_toolkit(home):
    """A toolkit folder: include/ and a real bin/nvcc (not a wrapper script, which some images
    put on PATH: the folder it calls into is found through /usr/local/cuda* instead)."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.isdir(os.path.join(home, "include")) and os.path.isfile(nvcc)):
        return False
    with open(nvcc, "rb") as f:
        return f.read(2) != b"#!"


def _cuda_folder_version(path):
    try:
        return Version(os.path.basename(path).partition("-")[2] or "0")
    except InvalidVersion:
        return Version("0")


def _toolkit_candidates():
    """CUDA toolkit folders in order of preference: CUDA_HOME / CUDA_PATH, the toolkit of the
    nvcc on PATH, then /usr/local/cuda* newest first; each folder once."""
    cands = []
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.isfile(os.path.join(env, "bin", "nvcc")):
        cands.append(env)
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            cands.append(home)
    local = sorted(glob.glob("/usr/local/cuda*"), key=_cuda_folder_version, reverse=True)
    cands += [c for c in local if _is_toolkit(c)]
    seen, out = set(), []
    for c in cands:
        real = os.path.realpath(c)
        if real not in seen:
            seen.add(real)
            out.append(c)
    return out


def select_toolkit(torch_cuda, candidates, release_of=None):
    """Return (cuda_home, reason_if_none): the first candidate folder whose nvcc has the major
    version of torch's CUDA (``torch_cuda``, e.g. "13.0"; None for a CPU-only torch).
    ``release_of(folder)`` gives a folder's CUDA release (default: ask its nvcc)."""
    release_of = release_of or _nvcc_release
    if torch_cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if not candidates:
        return None, (
            "no CUDA toolkit found (nvcc is not on PATH, CUDA_HOME is not set, and no "
            "/usr/local/cuda* holds one)"
        )
    want = Version(torch_cuda)
    found = []
    for home in candidates:
        release = release_of(home)
        if release is not None and release.major == want.major:
            if found:
                print(
                    f"sdvae: using the CUDA {release} toolkit at {home}, which matches torch's "
                    f"CUDA {torch_cuda}; skipped: {', '.join(found)}",
                    file=sys.stderr,
                )
            return home, None
        found.append(f"{home} (CUDA {release if release is not None else 'unknown'})")
    return None, (
        f"no CUDA toolkit matches torch's CUDA {torch_cuda} (major version {want.major}, which "
        f"torch requires for extensions): found {', '.join(found)}; install that toolkit or set "
        "CUDA_HOME to it"
    )


def _find_cuda_home():
    """Return (cuda_home, reason_if_none)."""
    return select_toolkit(torch.version.cuda, _toolkit_candidates())


def _c_string(text):
    """``text`` as a C string literal (ASCII; anything else escaped as octal bytes)."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def write_build_config(folder, cpu_only_reason):
    """Write ``sdvae_build_config.h`` into ``folder`` (csrc/sdvae.cpp includes it): why this
    build has no CUDA kernels, empty when it has them."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "sdvae_build_config.h")
    text = (
        "// Generated by setup.py (not in git): how this build of sdvae._C was configured.\n"
        "#pragma once\n"
        "// Why the CUDA kernels were not built (empty when they were).\n"
        f"#define SDVAE_CPU_ONLY_REASON {_c_string(cpu_only_reason or '')}\n"
    )
    old = None
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    if old != text:  # unchanged: keep its timestamp, so ninja rebuilds nothing
        with open(path, "w") as f:
            f.write(text)
    return path


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


def _extension(generated_dir=None):
    here = os.path.dirname(os.path.abspath(__file__))
    generated_dir = generated_dir or os.path.join(here, "build", "sdvae_generated")
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
    write_build_config(generated_dir, reason if cuda_home is None else "")
    if cuda_home is None:
        print(f"sdvae: building the CPU extension only ({reason})", file=sys.stderr)
        return cpp_extension.CppExtension(
            "sdvae._C", cpp, include_dirs=[generated_dir], extra_compile_args={"cxx": cxx_flags}
        )
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    macros = [("SDVAE_WITH_CUDA", None)]
    include_dirs, link_args = [generated_dir], []
    fe_inc, fe_reason = _find_cudnn_frontend()
    cudnn_inc, cudnn_lib, cudnn_reason = _find_cudnn(cuda_home)
    nvrtc_inc, nvrtc_lib = _find_nvrtc(cuda_home)
    if fe_inc and cudnn_inc and not nvrtc_inc:
        fe_inc, fe_reason = None, "nvrtc.h not found (cudnn-frontend's headers include it)"
    if fe_inc and cudnn_inc:
        # cudnn.h first: the frontend must see the cuDNN that torch loads at run time.
        include_dirs = [cudnn_inc, fe_inc, generated_dir]
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


if __name__ == "__main__":  # pip runs this file as __main__; tests import its functions
    setup(
        packages=["sdvae", "sdvae.bench", "sdvae.kernels"],
        package_dir={"sdvae": "sdvae", "sdvae.kernels": "kernels"},
        ext_modules=[_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
