// sdvae::conv2d — conv2d(F.pad(x, padding), weight, bias, stride) + residual, padding in F.pad
// order (left, right, top, bottom), groups 1, dilation 1.
//
// CUDA: one cuDNN graph (csrc/cuda/conv2d.cpp): the asymmetric padding as the conv's pre/post
// padding (no padded copy), bias and residual as pointwise adds in the same graph when
// fuse_epilogue (else the bare graph conv, then ATen adds). A graph cuDNN refuses, or a build
// without cudnn-frontend, runs eager (at::conv2d of the padded input, + residual) with the reason
// recorded (conv2d_fallbacks(), printed by `sdvae check`) and warned once: never silently.
// CPU: pad_conv2d's C++ CPU kernel (csrc/pad_conv2d.cpp), then the residual added in place.
//
// The Python wrapper (sdvae/ops.py) checks the arguments first, runs the eager reference when an
// input requires grad, and registers the fake (meta) kernel.
#include "conv2d.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <sstream>

namespace sdvae {

namespace {

std::atomic<int64_t> g_built{0}, g_refused{0};
std::mutex g_fallback_mutex;
std::vector<std::string> g_fallbacks;

at::MemoryFormat format_of(const ConvGeometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::string shape_string(const ConvGeometry& g, at::ScalarType dt, bool bias, bool residual,
                         bool fused) {
  std::ostringstream s;
  s << g.N << "x" << g.C << "x" << g.H << "x" << g.W << " -> " << g.Cout << " " << g.KH << "x"
    << g.KW << " stride " << g.stride << " pad (" << g.pl << "," << g.pr << "," << g.pt << ","
    << g.pb << ") " << dt << (g.channels_last ? " channels_last" : " nchw")
    << (bias ? " +bias" : "") << (residual ? " +residual" : "")
    << (fused && (bias || residual) ? " (epilogue)" : "");
  return s.str();
}

}  // namespace

ConvGeometry conv2d_check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, int64_t stride,
                               at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(),
                    "-D with shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be 4-D (Cout, C, KH, KW), got ",
                    weight.dim(), "-D with shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), op, ": weight has ", weight.size(1),
                    " input channels but x has ", x.size(1), " (groups = 1)");
  TORCH_CHECK_VALUE(x.size(1) > 0 && weight.size(0) > 0 && weight.size(2) > 0 &&
                        weight.size(3) > 0,
                    op, ": weight must have non-zero sizes, got ", weight.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, op, ": weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", dt);
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(),
                    " but x is on ", x.device());
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op,
                      ": bias must have shape (", weight.size(0), ",), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == dt, op, ": bias dtype ", b.scalar_type(),
                     " differs from x dtype ", dt);
    TORCH_CHECK_VALUE(b.device() == x.device(), op, ": bias is on ", b.device(),
                      " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 4, op,
                    ": padding must be (left, right, top, bottom), got ", padding);
  for (auto p : padding) {
    TORCH_CHECK_VALUE(p >= 0, op, ": padding must be non-negative, got ", padding);
  }
  ConvGeometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = weight.size(0);
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.stride = stride;
  g.pl = padding[0];
  g.pr = padding[1];
  g.pt = padding[2];
  g.pb = padding[3];
  const int64_t hp = g.H + g.pt + g.pb, wp = g.W + g.pl + g.pr;
  TORCH_CHECK_VALUE(hp >= g.KH && wp >= g.KW, op, ": padded input ", hp, "x", wp,
                    " is smaller than the kernel ", g.KH, "x", g.KW, " (x shape ", x.sizes(),
                    ", padding ", padding, ")");
  g.OH = (hp - g.KH) / stride + 1;
  g.OW = (wp - g.KW) / stride + 1;
  if (residual.has_value()) {
    const auto& r = *residual;
    TORCH_CHECK_VALUE(r.dim() == 4 && r.size(0) == g.N && r.size(1) == g.Cout &&
                          r.size(2) == g.OH && r.size(3) == g.OW,
                      op, ": residual must have the output's shape (", g.N, ", ", g.Cout, ", ",
                      g.OH, ", ", g.OW, "), got ", r.sizes());
    TORCH_CHECK_TYPE(r.scalar_type() == dt, op, ": residual dtype ", r.scalar_type(),
                     " differs from x dtype ", dt);
    TORCH_CHECK_VALUE(r.device() == x.device(), op, ": residual is on ", r.device(),
                      " but x is on ", x.device());
  }
  // Same rule as the fake implementations in sdvae/ops.py: channels_last only when the input is
  // channels_last and not also plain contiguous.
  g.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return g;
}

void conv2d_note_plan_built(bool ok) { (ok ? g_built : g_refused)++; }

void conv2d_record_fallback(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(g_fallback_mutex);
    if (std::find(g_fallbacks.begin(), g_fallbacks.end(), reason) != g_fallbacks.end()) return;
    g_fallbacks.push_back(reason);
  }
  TORCH_WARN("sdvae: ", reason);  // outside the lock: a warning handler may take the GIL
}

std::vector<std::string> conv2d_fallbacks() {
  std::lock_guard<std::mutex> lock(g_fallback_mutex);
  return g_fallbacks;
}

std::vector<int64_t> conv2d_stats() {
#ifdef SDVAE_WITH_CUDNN_FE
  const int64_t cached = graph_conv_cached_plans();
#else
  const int64_t cached = 0;
#endif
  return {g_built.load(), g_refused.load(), cached};
}

void conv2d_reset_stats() {
#ifdef SDVAE_WITH_CUDNN_FE
  graph_conv_clear_plans();
#endif
  g_built = 0;
  g_refused = 0;
  std::lock_guard<std::mutex> lock(g_fallback_mutex);
  g_fallbacks.clear();
}

bool graph_conv_available() {
#ifdef SDVAE_WITH_CUDNN_FE
  return true;
#else
  return false;
#endif
}

std::string conv2d_build_info() {
#ifdef SDVAE_WITH_CUDNN_FE
  return "graph conv: " + graph_conv_build_info();
#elif defined(SDVAE_WITH_CUDA)
  return "graph conv: not built (no cudnn-frontend headers at build time)";
#else
  return "graph conv: CPU-only build";
#endif
}

namespace {

// Kernels in the schema's argument order (csrc/sdvae.cpp).
at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t stride,
                      at::IntArrayRef padding, const std::optional<at::Tensor>& residual,
                      bool /*fuse_epilogue: one result on the CPU*/) {
  conv2d_check_args("conv2d", x, weight, bias, residual, stride, padding);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "conv2d: x must be a CPU tensor here, got ",
                    x.device());
  at::Tensor out = pad_conv2d_cpu(x, weight, bias, stride, padding);
  if (residual.has_value() && out.numel() > 0) out.add_(*residual);
  return out;
}

}  // namespace

#ifdef SDVAE_WITH_CUDA
namespace {

// Eager: what the op means, on the padded copy (a cuDNN refusal, or no cudnn-frontend).
at::Tensor conv2d_eager(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual) {
  const at::NoGradGuard no_grad;
  const bool padded = g.pl || g.pr || g.pt || g.pb;
  const at::Tensor xp = padded ? at::constant_pad_nd(x, {g.pl, g.pr, g.pt, g.pb}, 0) : x;
  at::Tensor y = at::conv2d(xp, weight, bias, {g.stride, g.stride});
  if (residual.has_value()) y.add_(*residual);
  return y.contiguous(format_of(g));
}

}  // namespace

at::Tensor conv2d_cuda_run(const char* op, const at::Tensor& x_in, const at::Tensor& weight_in,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual_in, int64_t stride,
                           at::IntArrayRef padding, bool fuse_epilogue) {
  const ConvGeometry g = conv2d_check_args(op, x_in, weight_in, bias, residual_in, stride, padding);
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor here, got ", x_in.device());
  const at::MemoryFormat fmt = format_of(g);
  // Every tensor dense in x's layout: a weight or residual in the other layout is reordered
  // here, once per call (the model keeps its weights in the activations' layout).
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor w = weight_in.contiguous(fmt);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = residual_in->contiguous(fmt);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  const bool fuse = fuse_epilogue && (bias.has_value() || residual.has_value());
  at::Tensor y = at::empty({g.N, g.Cout, g.OH, g.OW}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  if (x.numel() == 0) {
    // An empty input padded into a non-empty output (the output is the bias): nothing for
    // cuDNN to convolve.
    return conv2d_eager(g, x, w, bias, residual);
  }
  std::string why;
#ifdef SDVAE_WITH_CUDNN_FE
  bool ok = false;
  if (fuse) {
    ok = graph_conv2d_cuda(g, x, w, b.defined() ? &b : nullptr,
                           residual.has_value() ? &*residual : nullptr, y, &why);
  } else {
    ok = graph_conv2d_cuda(g, x, w, nullptr, nullptr, y, &why);
    if (ok) {
      if (b.defined()) y.add_(b.view({1, g.Cout, 1, 1}));
      if (residual.has_value()) y.add_(*residual);
    }
  }
  if (ok) return y;
  why = "cuDNN refused the graph (" + why + ")";
#else
  why = "sdvae._C was built without cudnn-frontend headers (pip install nvidia-cudnn-frontend, "
        "then rebuild)";
#endif
  conv2d_record_fallback(std::string(op) + " " +
                         shape_string(g, x.scalar_type(), b.defined(), residual.has_value(),
                                      fuse) +
                         ": eager conv (padded copy, separate adds): " + why);
  return conv2d_eager(g, x, w, bias, residual);
}

namespace {
at::Tensor conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t stride,
                       at::IntArrayRef padding, const std::optional<at::Tensor>& residual,
                       bool fuse_epilogue) {
  return conv2d_cuda_run("conv2d", x, weight, bias, residual, stride, padding, fuse_epilogue);
}
}  // namespace
#endif

}  // namespace sdvae

TORCH_LIBRARY_IMPL(sdvae, CPU, m) { m.impl("conv2d", &sdvae::conv2d_cpu); }

#ifdef SDVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(sdvae, CUDA, m) { m.impl("conv2d", &sdvae::conv2d_cuda); }
#endif
