// Shared declarations of sdvae::conv2d / sdvae::pad_conv2d (csrc/conv2d.cpp, csrc/pad_conv2d.cpp,
// csrc/cuda/conv2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace sdvae {

struct ConvGeometry {
  int64_t N, C, H, W;      // input
  int64_t Cout, KH, KW;    // weight
  int64_t stride;
  int64_t pl, pr, pt, pb;  // padding: left, right, top, bottom (F.pad order)
  int64_t OH, OW;          // output
  bool channels_last;      // input (and therefore output) memory format
};

// Argument checks of conv2d (op names the op in the messages): ValueError / TypeError naming the
// argument. `residual`, when given, must have the output's shape, x's dtype and device.
ConvGeometry conv2d_check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, int64_t stride,
                               at::IntArrayRef padding);

// csrc/pad_conv2d.cpp: the C++ CPU kernel, conv2d(F.pad(x, padding), weight, bias, stride).
at::Tensor pad_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t stride,
                          at::IntArrayRef padding);

// csrc/conv2d.cpp: the CUDA entry of both ops (the cuDNN graph, or the eager fallback with its
// reason recorded).
at::Tensor conv2d_cuda_run(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, int64_t stride,
                           at::IntArrayRef padding, bool fuse_epilogue);

// Bookkeeping (csrc/conv2d.cpp): plans built / refused, and the fallback reasons.
void conv2d_note_plan_built(bool ok);
void conv2d_record_fallback(const std::string& reason);
std::vector<std::string> conv2d_fallbacks();
void conv2d_reset_stats();
std::vector<int64_t> conv2d_stats();  // {plans built, graphs refused, plans cached}
bool graph_conv_available();
std::string conv2d_build_info();

#ifdef SDVAE_WITH_CUDNN_FE
// csrc/cuda/conv2d.cpp: the cuDNN graph. `b` and `r` may be null; y is allocated by the caller.
// Returns false with the reason in *why when cuDNN refused the graph (y untouched).
bool graph_conv2d_cuda(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w,
                       const at::Tensor* b, const at::Tensor* r, at::Tensor& y, std::string* why);
int64_t graph_conv_cached_plans();
void graph_conv_clear_plans();
std::string graph_conv_build_info();
#endif

}  // namespace sdvae
