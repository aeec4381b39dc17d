// The sdvae operator library: every C++ op schema lives in this TORCH_LIBRARY block, and
// each op file adds its CPU/CUDA kernels with TORCH_LIBRARY_IMPL. Triton ops join the same
// `sdvae` namespace from Python (torch.library fragments).
#include <torch/extension.h>

#include <string>

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
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &sdvae::build_info, "What sdvae._C was compiled with");
  m.def("with_cuda", &sdvae::with_cuda, "Whether sdvae._C holds CUDA kernels");
}
