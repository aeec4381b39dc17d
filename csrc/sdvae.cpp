// The sdvae operator library: every C++ op schema lives in this TORCH_LIBRARY block, and
// each op file adds its CPU/CUDA kernels with TORCH_LIBRARY_IMPL. Triton ops join the same
// `sdvae` namespace from Python (torch.library fragments).
#include <torch/extension.h>

#include <string>

#include "conv2d.h"

// setup.py writes this header (build/sdvae_generated/, not in git): SDVAE_CPU_ONLY_REASON.
#if __has_include("sdvae_build_config.h")
#include "sdvae_build_config.h"
#endif
#ifndef SDVAE_CPU_ONLY_REASON
#define SDVAE_CPU_ONLY_REASON ""
#endif

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
  const std::string reason = SDVAE_CPU_ONLY_REASON;
  if (!reason.empty()) info += " (" + reason + ")";
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
        "[cuDNN graph plans built, graphs cuDNN refused, transient failures (not cached), plans "
        "cached] since the last reset");
  m.def("cudnn_conv_allows_tf32", &sdvae::cudnn_conv_allows_tf32,
        "Whether cuDNN convolutions may use TF32: torch's switch, as the graph conv reads it");
  m.def("conv2d_batch_chunks", &sdvae::conv2d_batch_chunks, py::arg("n"),
        py::arg("in_per_sample"), py::arg("out_per_sample"),
        "Batch chunks keeping each tensor handed to cuDNN under 2^31 elements ([] if none can)");
  m.def("conv2d_workspace_limit", &sdvae::conv2d_workspace_limit,
        "The cuDNN workspace cap in bytes: this thread's scoped limit, else "
        "SDVAE_CONV_WORKSPACE_LIMIT, default 1 GiB");
  m.def("conv2d_set_workspace_limit", &sdvae::conv2d_set_workspace_limit, py::arg("bytes"),
        "Set this thread's cuDNN workspace cap in bytes (-1 clears it); returns the previous "
        "setting (-1: none)");
  m.def("_conv2d_ladder_probe", &sdvae::conv2d_ladder_probe,
        "Test hook: the conv fallback ladder with scripted outcomes");
  m.def("_conv2d_failure_is_transient", &sdvae::conv2d_failure_is_transient,
        "Test hook: whether a cuDNN / CUDA failure message is one for now (an allocation)");
  m.def("_plan_cache_probe", &sdvae::plan_cache_probe,
        "Test hook: the plan cache's policy with scripted (handle, key, outcome) steps");
  m.def("conv2d_fallbacks", &sdvae::conv2d_fallbacks,
        "Why conv2d / pad_conv2d ran eager instead of the cuDNN graph, one line per case");
  m.def("conv2d_time_plans", &sdvae::conv2d_time_plans, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("residual"), py::arg("stride"), py::arg("padding"),
        py::arg("fuse_epilogue"), py::arg("max_plans"), py::arg("reps"),
        py::call_guard<py::gil_scoped_release>(),
        "Every cuDNN plan for one conv2d call, built and timed (GPU): (index of the candidate "
        "conv2d takes or -1, cuDNN's refusal, [(index, name, workspace bytes, median ms or -1, "
        "error)])");
  m.def("conv2d_reset_stats", &sdvae::conv2d_reset_stats,
        "Drop the cached plans, the counters and the fallback list");
}
