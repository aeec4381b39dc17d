// sdvae::conv2d — conv2d(F.pad(x, padding), weight, bias, stride) + residual, padding in F.pad
// order (left, right, top, bottom), groups 1, dilation 1.
//
// CUDA: one cuDNN graph (csrc/cuda/conv2d.cpp): the asymmetric padding as the conv's pre/post
// padding (no padded copy), bias and residual as pointwise adds in the same graph when
// fuse_epilogue (else the bare graph conv, then ATen adds). When cuDNN refuses the fused graph,
// the bare graph + ATen adds runs; when it refuses that too, or in a build without
// cudnn-frontend, eager (at::conv2d of the padded input, + residual). Every step down the ladder
// is recorded with its reason (conv2d_fallbacks(), printed by `sdvae check`) and warned once:
// never silently. A failure for now (out of memory while building a plan or allocating its
// workspace) steps down this once and is not cached. Tensors of 2^31 elements or more never reach
// cuDNN (32-bit indexing): the batch is split into chunks under that, as torch does; a single
// sample that large runs eager, recorded.
// CPU: pad_conv2d's C++ CPU kernel (csrc/pad_conv2d.cpp), then the residual added in place.
//
// The decisions (TF32 switch, batch chunks, ladder, plan-cache policy, workspace limit) are plain
// functions compiled into every build, so that the tests exercise them without a GPU.
//
// The Python wrapper (sdvae/ops.py) checks the arguments first, runs the eager reference when an
// input requires grad, and registers the fake (meta) kernel.
#include "conv2d.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <sstream>
#include <type_traits>

namespace sdvae {

namespace {

std::atomic<int64_t> g_built{0}, g_refused{0}, g_transient{0};
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

void conv2d_note_plan_built(GraphOutcome outcome) {
  switch (outcome) {
    case GraphOutcome::kRan:
      g_built++;
      break;
    case GraphOutcome::kRefused:
      g_refused++;
      break;
    case GraphOutcome::kTransient:
      g_transient++;
      break;
  }
}

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
namespace {
// torch >= 2.9 asks for the operator: by name in 2.9 (const std::string&), as an
// std::optional<at::Float32Op> since. Which one the installed header declares is read off the
// method's parameter type, so this compiles against either.
template <typename Method>
struct FirstParameter;
template <typename R, typename C, typename A>
struct FirstParameter<R (C::*)(A) const> {
  using type = std::decay_t<A>;
};

// Ctx is a template parameter too, so that neither call is checked before the one that applies
// is chosen.
template <typename OpArg, typename Ctx>
bool conv_tf32_per_op(const Ctx& ctx) {
  if constexpr (std::is_same_v<OpArg, std::string>) {
    return ctx.allowTF32CuDNN(std::string("conv"));
  } else {
    return ctx.allowTF32CuDNN(OpArg::value_type::CONV);
  }
}
}  // namespace
#endif

bool cudnn_conv_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  using OpArg = FirstParameter<decltype(&at::Context::allowTF32CuDNN)>::type;
  return conv_tf32_per_op<OpArg>(at::globalContext());
#else
  return at::globalContext().allowTF32CuDNN();  // torch 2.6-2.8: one switch for all of cuDNN
#endif
}

std::vector<int64_t> conv2d_batch_chunks(int64_t n, int64_t in_per_sample,
                                         int64_t out_per_sample) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();  // elements per tensor, at most
  const int64_t per_sample = std::max(in_per_sample, out_per_sample);
  if (n <= 0) return {};
  if (per_sample == 0 || n <= kMax / per_sample) return {n};
  const int64_t fit = kMax / per_sample;  // samples per chunk, at most
  if (fit == 0) return {};
  const int64_t count = (n + fit - 1) / fit;
  const int64_t size = (n + count - 1) / count;  // <= fit; equal chunks keep one plan for all
  std::vector<int64_t> chunks;
  for (int64_t left = n; left > 0; left -= size) chunks.push_back(std::min(size, left));
  return chunks;
}

bool conv2d_failure_is_transient(const std::string& message) {
  // cuDNN's allocation statuses (cudnn_graph.h: ..._HOST_ALLOCATION_FAILED,
  // ..._DEVICE_ALLOCATION_FAILED, the older ALLOC_FAILED) and CUDA's out of memory.
  for (const char* mark : {"ALLOCATION_FAILED", "ALLOC_FAILED", "out of memory",
                           "OUT_OF_MEMORY", "cudaErrorMemoryAllocation"}) {
    if (message.find(mark) != std::string::npos) return true;
  }
  return false;
}

ConvPath conv2d_ladder(bool fused, const std::function<GraphAttempt(bool fused)>& try_graph,
                       std::string* why) {
  why->clear();
  auto note = [why](const char* which, const GraphAttempt& a) {
    if (!why->empty()) *why += "; ";
    *why += which;
    *why += a.outcome == GraphOutcome::kTransient ? " failed for now, not cached (" :
                                                    " refused by cuDNN (";
    *why += a.why + ")";
  };
  if (fused) {
    const GraphAttempt a = try_graph(true);
    if (a.outcome == GraphOutcome::kRan) return ConvPath::kFusedGraph;
    note("fused graph", a);
  }
  const GraphAttempt a = try_graph(false);
  if (a.outcome == GraphOutcome::kRan) return ConvPath::kBareGraph;
  note(fused ? "bare graph" : "graph", a);
  return ConvPath::kEager;
}

namespace {
// The calling thread's scoped workspace limit (-1: none, the environment's applies). Per thread:
// a budgeted call in one thread never changes the convolutions of another.
thread_local int64_t t_workspace_limit = -1;
}  // namespace

int64_t conv2d_set_workspace_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= -1, "workspace limit must be a byte count >= 0 (or -1 to clear), got ",
                    bytes);
  const int64_t previous = t_workspace_limit;
  t_workspace_limit = bytes;
  return previous;
}

int64_t conv2d_workspace_limit() {
  if (t_workspace_limit >= 0) return t_workspace_limit;
  constexpr const char* kVar = "SDVAE_CONV_WORKSPACE_LIMIT";
  const char* env = std::getenv(kVar);
  if (env == nullptr || *env == '\0') return kDefaultWorkspaceLimit;
  const std::string text(env);
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) digits++;
  const std::string unit = text.substr(digits);
  int64_t scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  if (unit == "KiB") scale = int64_t{1} << 10;
  if (unit == "MiB") scale = int64_t{1} << 20;
  if (unit == "GiB") scale = int64_t{1} << 30;
  TORCH_CHECK_VALUE(digits > 0 && scale > 0, kVar,
                    " must be a byte count, optionally with a KiB, MiB or GiB suffix (e.g. ",
                    "268435456 or 256MiB), got '", text, "'");
  // 15 digits at most: stoll cannot overflow, and the product below stays in range.
  TORCH_CHECK_VALUE(digits <= 15 && std::stoll(text.substr(0, digits)) <=
                                        std::numeric_limits<int64_t>::max() / scale,
                    kVar, " is too large: '", text, "'");
  return std::stoll(text.substr(0, digits)) * scale;
}

std::tuple<std::string, std::string, std::vector<bool>> conv2d_ladder_probe(
    bool fused, const std::vector<std::string>& outcomes) {
  std::vector<bool> attempts;
  size_t next = 0;
  auto try_graph = [&](bool f) {
    attempts.push_back(f);
    TORCH_CHECK_VALUE(next < outcomes.size(), "conv2d_ladder_probe: no outcome left for attempt ",
                      next + 1);
    const std::string& o = outcomes[next++];
    if (o == "ran") return GraphAttempt{GraphOutcome::kRan, ""};
    if (o == "refused") {
      return GraphAttempt{GraphOutcome::kRefused, f ? "no fused engine" : "no engine"};
    }
    TORCH_CHECK_VALUE(o == "transient", "conv2d_ladder_probe: unknown outcome '", o, "'");
    return GraphAttempt{GraphOutcome::kTransient,
                        "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"};
  };
  std::string why;
  const ConvPath path = conv2d_ladder(fused, try_graph, &why);
  const char* names[] = {"fused graph", "bare graph", "eager"};
  return {names[static_cast<int>(path)], why, attempts};
}

std::vector<bool> plan_cache_probe(
    const std::vector<std::tuple<int64_t, int64_t, std::string>>& steps) {
  struct ProbePlan {
    bool transient = false;
  };
  PlanCache<ProbePlan> cache;
  std::vector<bool> built;
  for (const auto& [handle, key, outcome] : steps) {
    bool b = false;
    cache.get_or_build(
        reinterpret_cast<const void*>(static_cast<std::uintptr_t>(handle)), {key},
        [&outcome = outcome] {
          auto p = std::make_shared<ProbePlan>();
          p->transient = outcome == "transient";
          return p;
        },
        &b);
    built.push_back(b);
  }
  return built;
}

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
  return {g_built.load(), g_refused.load(), g_transient.load(), cached};
}

void conv2d_reset_stats() {
#ifdef SDVAE_WITH_CUDNN_FE
  graph_conv_clear_plans();
#endif
  g_built = 0;
  g_refused = 0;
  g_transient = 0;
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

ConvPlanTimings conv2d_time_plans(const at::Tensor& x_in, const at::Tensor& weight_in,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual_in, int64_t stride,
                                  std::vector<int64_t> padding, bool fuse_epilogue,
                                  int64_t max_plans, int64_t reps) {
  const char* op = "conv2d_time_plans";
  const ConvGeometry g = conv2d_check_args(op, x_in, weight_in, bias, residual_in, stride, padding);
  TORCH_CHECK_VALUE(max_plans >= 1, op, ": max_plans must be >= 1, got ", max_plans);
  TORCH_CHECK_VALUE(reps >= 1, op, ": reps must be >= 1, got ", reps);
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
#ifdef SDVAE_WITH_CUDNN_FE
  const at::MemoryFormat fmt = format_of(g);
  TORCH_CHECK_VALUE(x_in.numel() > 0 && g.Cout * g.OH * g.OW > 0, op,
                    ": an empty input or output has nothing to time");
  TORCH_CHECK_VALUE(conv2d_batch_chunks(g.N, g.C * g.H * g.W, g.Cout * g.OH * g.OW).size() == 1,
                    op, ": a tensor of 2^31 elements or more (conv2d splits the batch; time a "
                    "smaller batch)");
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor w = weight_in.contiguous(fmt);
  at::Tensor b, r;
  if (bias.has_value()) b = bias->contiguous();
  if (residual_in.has_value()) r = residual_in->contiguous(fmt);
  const bool fuse = fuse_epilogue && (b.defined() || r.defined());
  at::Tensor y = at::empty({g.N, g.Cout, g.OH, g.OW}, x.options().memory_format(fmt));
  return graph_conv2d_time_plans(g, x, w, fuse && b.defined() ? &b : nullptr,
                                 fuse && r.defined() ? &r : nullptr, y, max_plans, reps);
#else
  (void)g;
  (void)fuse_epilogue;
  TORCH_CHECK(false, op, ": needs the cuDNN graph conv, and ", conv2d_build_info());
  return {};
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

#ifdef SDVAE_WITH_CUDNN_FE
// One batch chunk down the ladder: the fused graph, the bare graph + ATen adds, eager. y is the
// chunk's output (a view of the whole output); what() names the case in the fallback list.
void conv2d_run_chunk(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& b, const std::optional<at::Tensor>& r, at::Tensor& y,
                      bool fuse, const std::function<std::string()>& what) {
  const at::Tensor* bp = b.defined() ? &b : nullptr;
  const at::Tensor* rp = r.has_value() ? &*r : nullptr;
  std::string why;
  const ConvPath path = conv2d_ladder(
      fuse,
      [&](bool fused) {
        return fused ? graph_conv2d_cuda(g, x, w, bp, rp, y)
                     : graph_conv2d_cuda(g, x, w, nullptr, nullptr, y);
      },
      &why);
  if (path == ConvPath::kFusedGraph) return;
  if (path == ConvPath::kBareGraph) {
    if (bp != nullptr) y.add_(b.view({1, g.Cout, 1, 1}));
    if (rp != nullptr) y.add_(*rp);
    if (fuse) conv2d_record_fallback(what() + ": bare cuDNN graph + ATen adds: " + why);
    return;
  }
  conv2d_record_fallback(what() + ": eager conv (padded copy, separate adds): " + why);
  std::optional<at::Tensor> bias;
  if (bp != nullptr) bias = b;
  y.copy_(conv2d_eager(g, x, w, bias, r));
}
#endif

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
  auto what = [&](int64_t n) {
    ConvGeometry gn = g;
    gn.N = n;
    return std::string(op) + " " +
           shape_string(gn, x.scalar_type(), b.defined(), residual.has_value(), fuse);
  };
#ifdef SDVAE_WITH_CUDNN_FE
  // Batch chunks of under 2^31 elements per tensor (x, y and the residual, which has y's shape).
  // Batch is the outermost dimension in both layouts, so each chunk is a dense view.
  const std::vector<int64_t> chunks =
      conv2d_batch_chunks(g.N, g.C * g.H * g.W, g.Cout * g.OH * g.OW);
  if (chunks.empty()) {
    conv2d_record_fallback(what(g.N) +
                           ": eager conv (padded copy, separate adds): one sample has 2^31 "
                           "elements or more, past cuDNN's 32-bit indexing; no batch split helps");
    return conv2d_eager(g, x, w, bias, residual);
  }
  int64_t start = 0;
  for (const int64_t n : chunks) {
    ConvGeometry gc = g;
    gc.N = n;
    const bool whole = n == g.N;
    const at::Tensor xc = whole ? x : x.narrow(0, start, n);
    std::optional<at::Tensor> rc;
    if (residual.has_value()) rc = whole ? *residual : residual->narrow(0, start, n);
    at::Tensor yc = whole ? y : y.narrow(0, start, n);
    conv2d_run_chunk(gc, xc, w, b, rc, yc, fuse, [&] { return what(n); });
    start += n;
  }
  return y;
#else
  conv2d_record_fallback(what(g.N) +
                         ": eager conv (padded copy, separate adds): sdvae._C was built without "
                         "cudnn-frontend headers (pip install nvidia-cudnn-frontend, then "
                         "rebuild)");
  return conv2d_eager(g, x, w, bias, residual);
#endif
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
