// The sdvae operator library: every C++ op schema lives in this TORCH_LIBRARY block, and
// each op file adds its CPU/CUDA kernels with TORCH_LIBRARY_IMPL. Triton ops join the same
// `sdvae` namespace from Python (torch.library fragments).
#include <torch/extension.h>

#include <string>

#include "conv2d.h"

namespace sdvae {

#ifdef SDVAE_WITH_CUDA
std::string cuda_build_info();  // csrc/cuda/build_info.cu
#endif

// What this binary was built with, for `sdvae check` and the device check log.
std::string build_info() {
  std::string info = "torch " TORCH_VERSION;
#ifdef SDVAE_WITH_CUDA
  info += "; " + cuda_build_info();
#else
  info += "; CPU only";
#endif
  info += "; " + conv2d_build_info();
  return info;
}

bool with_cuda() {
#ifdef SDVAE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace sdvae

TORCH_LIBRARY(sdvae, m) {
  // Op schemas are added here, one line per op (see DESIGN.md, "Public API").
  // conv2d(F.pad(x, padding), weight, bias, stride); padding = (left, right, top, bottom).
  m.def("pad_conv2d(Tensor x, Tensor weight, Tensor? bias, int stride, int[] padding) -> Tensor");
  // conv2d(F.pad(x, padding), weight, bias, stride) + residual; fuse_epilogue: bias and residual
  // inside the cuDNN graph (else added after the bare graph conv).
  m.def(
      "conv2d(Tensor x, Tensor weight, Tensor? bias, int stride, int[] padding, Tensor? residual, "
      "bool fuse_epilogue) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &sdvae::build_info, "What sdvae._C was compiled with");
  m.def("with_cuda", &sdvae::with_cuda, "Whether sdvae._C holds CUDA kernels");
  m.def("graph_conv_available", &sdvae::graph_conv_available,
        "Whether the cuDNN graph conv (cudnn-frontend) was compiled in");
  m.def("conv2d_stats", &sdvae::conv2d_stats,
        "[cuDNN graph plans built, graphs cuDNN refused, plans cached] since the last reset");
  m.def("conv2d_fallbacks", &sdvae::conv2d_fallbacks,
        "Why conv2d / pad_conv2d ran eager instead of the cuDNN graph, one line per case");
  m.def("conv2d_reset_stats", &sdvae::conv2d_reset_stats,
        "Drop the cached plans, the counters and the fallback list");
}
