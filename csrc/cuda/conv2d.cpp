// CUDA half of sdvae::conv2d (and of sdvae::pad_conv2d): one cuDNN graph per call shape,
//   y = conv(x, w; stride, pre_padding (top, left), post_padding (bottom, right))
//       [+ bias] [+ residual]
// built with cudnn-frontend's header-only C++ graph API (the `nvidia-cudnn-frontend` wheel's
// include/ folder; setup.py finds it) against the cuDNN library torch already loads.
//
// Why a graph: cuDNN's graph API takes separate pre- and post-padding, so the encoder's
// (0, 1, 0, 1)-padded stride-2 conv needs no padded copy of its input, and the bias add and the
// residual add can run inside the same graph as pointwise nodes (the "epilogue", fp32 between the
// nodes, one rounding at the end) instead of as separate broadcast adds. Measured on an H200
// (shared/gpu/2026-11-30-h200, probes.jsonl): the padded conv at 0.93-0.97x cuDNN on an already
// padded input; the fused epilogue 13-51% slower than the bare conv but faster than eager's conv
// + bias + add on the big shapes. Which one the model takes is decided per shape by the bench
// (`sdvae bench conv`), so both are callable: `fuse_epilogue` = false runs the bare graph and
// adds bias and residual with ATen afterwards.
//
// Plans: one per (cuDNN handle, device, dtype, memory layout, shapes, pointer alignments,
// padding, stride, epilogue, TF32 and determinism settings, workspace limit), built on first use
// and kept in a PlanCache (csrc/conv2d.h): torch gives each thread its own cuDNN handle, so a plan
// is only ever executed by one thread (cuDNN does not promise that execution plans are
// thread-safe across engines; PyTorch keeps its cuDNN plans per thread too). The second call with
// the same key on the same thread builds nothing (`sdvae.ops.plan_stats()` counts the builds). A
// graph that cuDNN refuses (validate / heuristics / check_support / build fails) is remembered as
// refused with cuDNN's message, and the caller steps down its ladder (csrc/conv2d.cpp: the bare
// graph + ATen adds, then eager), recording why. A failure for now (out of memory while building,
// or while allocating the workspace) is not remembered: the next call tries again. A failure
// while *executing* a plan that was built is an error, never a fallback.
//
// Workspace: engines that want more than conv2d_workspace_limit() (SDVAE_CONV_WORKSPACE_LIMIT,
// default 1 GiB) are filtered out before a plan is chosen, so such an engine is never picked and
// then fails to allocate; the workspace comes from torch's caching allocator (at::empty).
//
// Execution: torch's cuDNN handle for the current device and thread, with the current stream.
//
// Numerics: fp16 / bf16 / fp32 I/O; the conv accumulates in fp32 (compute type FLOAT) and the
// epilogue runs in fp32 (intermediate type FLOAT). Engines that down-convert their inputs are
// never taken; for fp32, engines on tensor cores (TF32) are taken only when torch lets its own
// convolutions use TF32 (cudnn_conv_allows_tf32(): torch.backends.cudnn.conv.fp32_precision on
// torch >= 2.9, torch.backends.cudnn.allow_tf32 before).
// Host code that runs once per plan: cudnn-frontend's headers (templates, JSON) take GCC 154 s
// and 3.7 GB at -O3 for this one file, 83 s at -O1 (2-core VM), so this file is built at -O1.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O1")
#endif
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/Sleep.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "../conv2d.h"

namespace sdvae {

namespace fe = cudnn_frontend;

namespace {

constexpr int64_t kUidX = 1, kUidW = 2, kUidB = 3, kUidR = 4, kUidY = 5;

struct GraphPlan {
  std::shared_ptr<fe::graph::Graph> graph;  // null when cuDNN refused the graph
  int64_t workspace = 0;
  std::string refused;     // the reason when graph is null
  bool transient = false;  // the failure was one for now (not cached)
};

PlanCache<GraphPlan>& plan_cache() {
  static PlanCache<GraphPlan> cache;
  return cache;
}

fe::DataType_t fe_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return fe::DataType_t::HALF;
    case at::kBFloat16:
      return fe::DataType_t::BFLOAT16;
    default:
      return fe::DataType_t::FLOAT;
  }
}

// The largest power of two (at most 16) dividing the address: the alignment cuDNN may assume.
int64_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  int64_t al = 16;
  while (al > 1 && (a % static_cast<std::uintptr_t>(al)) != 0) al /= 2;
  return al;
}

std::vector<int64_t> vec(at::IntArrayRef r) { return std::vector<int64_t>(r.begin(), r.end()); }

// The strides of a dense (N, C, H, W) tensor in NCHW or NHWC order. The tensors handed to cuDNN
// are dense in that order; strides of size-1 dimensions are normalised this way, so that e.g. a
// 1x1 weight has the same description whatever torch reports for it.
std::vector<int64_t> dense_strides(at::IntArrayRef s, bool channels_last) {
  const int64_t n = s[0], c = s[1], h = s[2], w = s[3];
  (void)n;
  if (channels_last) return {h * w * c, 1, w * c, c};
  return {c * h * w, h * w, w, 1};
}

// Bias as a (1, K, 1, 1) tensor whose strides follow the output's layout.
std::vector<int64_t> bias_strides(int64_t K, bool channels_last) {
  return channels_last ? std::vector<int64_t>{K, 1, K, K} : std::vector<int64_t>{K, 1, 1, 1};
}

std::string describe(fe::error_t e, const char* step) {
  std::ostringstream s;
  s << step << ": " << e.get_message();
  return s.str();
}

std::shared_ptr<GraphPlan> refused_plan(std::string why) {
  auto plan = std::make_shared<GraphPlan>();
  plan->transient = conv2d_failure_is_transient(why);
  plan->refused = std::move(why);
  return plan;
}

// The graph for this call up to its candidate plans (validate, lower, heuristics, filter, check
// support): the graph, or null and the reason cuDNN refused it in `refused`.
std::shared_ptr<fe::graph::Graph> candidate_graph(const ConvGeometry& g, const at::Tensor& x,
                                                  const at::Tensor& w, const at::Tensor* b,
                                                  const at::Tensor* r, const at::Tensor& y,
                                                  bool tf32, bool deterministic,
                                                  int64_t workspace_limit, cudnnHandle_t handle,
                                                  std::string& refused) {
  auto graph = std::make_shared<fe::graph::Graph>();
  const auto io = fe_dtype(x.scalar_type());
  graph->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto X = graph->tensor(fe::graph::Tensor_attributes()
                             .set_name("x")
                             .set_uid(kUidX)
                             .set_dim(vec(x.sizes()))
                             .set_stride(dense_strides(x.sizes(), g.channels_last))
                             .set_alignment(alignment_of(x.const_data_ptr())));
  auto W = graph->tensor(fe::graph::Tensor_attributes()
                             .set_name("w")
                             .set_uid(kUidW)
                             .set_dim(vec(w.sizes()))
                             .set_stride(dense_strides(w.sizes(), g.channels_last))
                             .set_alignment(alignment_of(w.const_data_ptr())));
  auto conv = fe::graph::Conv_fprop_attributes()
                  .set_name("conv")
                  .set_pre_padding({g.pt, g.pl})
                  .set_post_padding({g.pb, g.pr})
                  .set_stride({g.stride, g.stride})
                  .set_dilation({1, 1});
  auto Y = graph->conv_fprop(X, W, conv);
  if (b != nullptr) {
    auto B = graph->tensor(fe::graph::Tensor_attributes()
                               .set_name("bias")
                               .set_uid(kUidB)
                               .set_dim({1, g.Cout, 1, 1})
                               .set_stride(bias_strides(g.Cout, g.channels_last))
                               .set_alignment(alignment_of(b->const_data_ptr())));
    Y = graph->pointwise(Y, B,
                         fe::graph::Pointwise_attributes().set_name("bias").set_mode(
                             fe::PointwiseMode_t::ADD));
  }
  if (r != nullptr) {
    auto R = graph->tensor(fe::graph::Tensor_attributes()
                               .set_name("residual")
                               .set_uid(kUidR)
                               .set_dim(vec(r->sizes()))
                               .set_stride(dense_strides(r->sizes(), g.channels_last))
                               .set_alignment(alignment_of(r->const_data_ptr())));
    Y = graph->pointwise(Y, R,
                         fe::graph::Pointwise_attributes().set_name("residual").set_mode(
                             fe::PointwiseMode_t::ADD));
  }
  Y->set_output(true)
      .set_uid(kUidY)
      .set_data_type(io)
      .set_dim(vec(y.sizes()))
      .set_stride(dense_strides(y.sizes(), g.channels_last))
      .set_alignment(alignment_of(y.const_data_ptr()));

  fe::error_t e = graph->validate();
  if (e.is_bad()) {
    refused = describe(e, "validate");
    return nullptr;
  }
  e = graph->build_operation_graph(handle);
  if (e.is_bad()) {
    refused = describe(e, "build_operation_graph");
    return nullptr;
  }
  e = graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
  if (e.is_bad()) {
    refused = describe(e, "create_execution_plans");
    return nullptr;
  }
  // As torch's own cuDNN convolutions: never an engine that down-converts its inputs, for fp32
  // no tensor-core (TF32) engine unless torch allows TF32 for convolutions (tf32, from
  // cudnn_conv_allows_tf32()), and no non-deterministic engine when
  // torch.backends.cudnn.deterministic (or torch.use_deterministic_algorithms) asks.
  std::vector<fe::NumericalNote_t> excluded{fe::NumericalNote_t::DOWN_CONVERT_INPUTS};
  if (x.scalar_type() == at::kFloat && !tf32) excluded.push_back(fe::NumericalNote_t::TENSOR_CORE);
  if (deterministic) excluded.push_back(fe::NumericalNote_t::NONDETERMINISTIC);
  graph->deselect_numeric_notes(excluded);
  // An engine that wants a huge workspace is never chosen: it would fail to allocate it.
  graph->deselect_workspace_greater_than(workspace_limit);
  e = graph->check_support(handle);
  if (e.is_bad()) {
    refused = describe(e, "check_support");
    return nullptr;
  }
  return graph;
}

// Build (candidate_graph, then the first candidate that builds) the plan for this call.
std::shared_ptr<GraphPlan> build_plan_steps(const ConvGeometry& g, const at::Tensor& x,
                                            const at::Tensor& w, const at::Tensor* b,
                                            const at::Tensor* r, const at::Tensor& y, bool tf32,
                                            bool deterministic, int64_t workspace_limit,
                                            cudnnHandle_t handle) {
  std::string refused;
  auto graph =
      candidate_graph(g, x, w, b, r, y, tf32, deterministic, workspace_limit, handle, refused);
  if (!graph) return refused_plan(refused);
  fe::error_t e = graph->build_plans(handle, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
  if (e.is_bad()) {
    return refused_plan(describe(e, "build_plans"));
  }
  int64_t ws = 0;
  e = graph->get_workspace_size(ws);
  if (e.is_bad()) {
    return refused_plan(describe(e, "get_workspace_size"));
  }
  auto plan = std::make_shared<GraphPlan>();
  plan->graph = std::move(graph);
  plan->workspace = ws;
  return plan;
}

// build_plan_steps, with an exception (out of memory, or one cudnn-frontend throws) turned into a
// refusal or, for an allocation, a failure for now.
std::shared_ptr<GraphPlan> build_plan(const ConvGeometry& g, const at::Tensor& x,
                                      const at::Tensor& w, const at::Tensor* b,
                                      const at::Tensor* r, const at::Tensor& y, bool tf32,
                                      bool deterministic, int64_t workspace_limit,
                                      cudnnHandle_t handle) {
  try {
    return build_plan_steps(g, x, w, b, r, y, tf32, deterministic, workspace_limit, handle);
  } catch (const c10::OutOfMemoryError&) {
    // A fixed text: the allocator's message carries live byte counts, and the fallback list
    // keeps one entry per distinct reason (a new one at every out-of-memory event otherwise).
    auto plan = refused_plan("building the plan: out of memory");
    plan->transient = true;
    return plan;
  } catch (const std::exception& e) {
    return refused_plan(std::string("building the plan: ") + e.what());
  }
}

std::vector<int64_t> plan_key(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor* b, const at::Tensor* r, const at::Tensor& y,
                              bool tf32, bool deterministic, int64_t workspace_limit) {
  // Sizes, layout and pointer alignments fix the graph's tensors; padding, stride, epilogue,
  // TF32, determinism and the workspace limit the rest. Strides need no entry: every tensor is
  // dense in the layout given. (The cache adds the cuDNN handle.)
  std::vector<int64_t> k{x.device().index(), static_cast<int64_t>(x.scalar_type()), tf32,
                         deterministic, g.channels_last, workspace_limit};
  k.insert(k.end(), x.sizes().begin(), x.sizes().end());
  k.insert(k.end(), w.sizes().begin(), w.sizes().end());
  k.insert(k.end(), {g.stride, g.pl, g.pr, g.pt, g.pb});
  k.push_back(alignment_of(x.const_data_ptr()));
  k.push_back(alignment_of(w.const_data_ptr()));
  k.push_back(alignment_of(y.const_data_ptr()));
  k.push_back(b != nullptr ? alignment_of(b->const_data_ptr()) : 0);
  k.push_back(r != nullptr ? alignment_of(r->const_data_ptr()) : 0);
  return k;
}

std::unordered_map<int64_t, void*> variant_pack(const at::Tensor& x, const at::Tensor& w,
                                               const at::Tensor* b, const at::Tensor* r,
                                               at::Tensor& y) {
  std::unordered_map<int64_t, void*> pack{
      {kUidX, const_cast<void*>(x.const_data_ptr())},
      {kUidW, const_cast<void*>(w.const_data_ptr())},
      {kUidY, y.mutable_data_ptr()},
  };
  if (b != nullptr) pack.emplace(kUidB, const_cast<void*>(b->const_data_ptr()));
  if (r != nullptr) pack.emplace(kUidR, const_cast<void*>(r->const_data_ptr()));
  return pack;
}

// What a call reads from torch each time: the switches that choose the plan, this thread's cuDNN
// handle for the device, set to the current stream.
struct CallContext {
  bool tf32, deterministic;
  int64_t workspace_limit;
  cudnnHandle_t handle;
  cudaStream_t stream;
};

CallContext call_context(const at::Tensor& x) {
  CallContext c{};
  c.tf32 = x.scalar_type() == at::kFloat && cudnn_conv_allows_tf32();
  c.deterministic =
      at::globalContext().deterministicCuDNN() || at::globalContext().deterministicAlgorithms();
  c.workspace_limit = conv2d_workspace_limit();
  c.handle = at::native::getCudnnHandle();  // this thread's, for this device
  c.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  TORCH_CHECK(cudnnSetStream(c.handle, c.stream) == CUDNN_STATUS_SUCCESS,
              "conv2d: cudnnSetStream failed");
  return c;
}

}  // namespace

// Runs the graph conv into y (allocated by the caller in x's memory format): kRan, or why not
// (then y is untouched); throws when a built plan fails to execute.
GraphAttempt graph_conv2d_cuda(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor* b, const at::Tensor* r, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CallContext c = call_context(x);
  const bool tf32 = c.tf32, deterministic = c.deterministic;
  const int64_t workspace_limit = c.workspace_limit;
  cudnnHandle_t handle = c.handle;
  bool built = false;
  const std::shared_ptr<GraphPlan> plan = plan_cache().get_or_build(
      handle, plan_key(g, x, w, b, r, y, tf32, deterministic, workspace_limit),
      [&] { return build_plan(g, x, w, b, r, y, tf32, deterministic, workspace_limit, handle); },
      &built);
  if (built) {
    conv2d_note_plan_built(plan->graph    ? GraphOutcome::kRan :
                           plan->transient ? GraphOutcome::kTransient :
                                             GraphOutcome::kRefused);
  }
  if (!plan->graph) {
    return {plan->transient ? GraphOutcome::kTransient : GraphOutcome::kRefused, plan->refused};
  }
  at::Tensor workspace;
  if (plan->workspace > 0) {
    try {
      workspace = at::empty({plan->workspace}, x.options().dtype(at::kByte));
    } catch (const c10::OutOfMemoryError&) {
      return {GraphOutcome::kTransient, "allocating its workspace of " +
                                            std::to_string(plan->workspace) +
                                            " bytes: out of memory"};
    }
  }
  std::unordered_map<int64_t, void*> pack = variant_pack(x, w, b, r, y);
  fe::error_t e = plan->graph->execute(
      handle, pack, workspace.defined() ? workspace.mutable_data_ptr() : nullptr);
  TORCH_CHECK(e.is_good(), "conv2d: executing the cuDNN graph failed: ", e.get_message());
  return {GraphOutcome::kRan, ""};
}

namespace {

// Times one built candidate. Three warm-up runs; then the GPU is held by a sleep kernel while
// every timed run is queued between its own pair of events, so that each time is the GPU's
// (not the host's submit cost, which a small conv can be shorter than); the median in ms, or
// -1 and the error. A CUDA error is thrown (it would poison every later measurement).
double time_candidate(fe::graph::Graph& graph, int64_t index, cudnnHandle_t handle,
                      cudaStream_t stream, std::unordered_map<int64_t, void*>& pack,
                      void* workspace, int64_t reps, std::string& error) {
  auto cuda_check = [](cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, "conv2d_time_plans: ", what, ": ",
                cudaGetErrorString(status));
  };
  for (int k = 0; k < 3; ++k) {
    const fe::error_t e = graph.execute_plan_at_index(handle, pack, workspace, index);
    if (e.is_bad()) {
      error = describe(e, "execute");
      cuda_check(cudaStreamSynchronize(stream), "after a failed run");
      return -1.0;
    }
  }
  cuda_check(cudaStreamSynchronize(stream), "warm-up");
  std::vector<cudaEvent_t> events(static_cast<size_t>(2 * reps), nullptr);
  for (auto& ev : events) cuda_check(cudaEventCreate(&ev), "cudaEventCreate");
  at::cuda::sleep(4000000);  // ~2 ms at 2 GHz: longer than queueing the runs takes
  int64_t queued = 0;
  for (; queued < reps; ++queued) {
    cuda_check(cudaEventRecord(events[2 * queued], stream), "cudaEventRecord");
    const fe::error_t e = graph.execute_plan_at_index(handle, pack, workspace, index);
    if (e.is_bad()) {
      error = describe(e, "execute");
      break;
    }
    cuda_check(cudaEventRecord(events[2 * queued + 1], stream), "cudaEventRecord");
  }
  cuda_check(cudaStreamSynchronize(stream), "timed runs");
  std::vector<float> times;
  for (int64_t k = 0; k < queued; ++k) {
    float ms = 0.0f;
    cuda_check(cudaEventElapsedTime(&ms, events[2 * k], events[2 * k + 1]), "elapsed time");
    times.push_back(ms);
  }
  for (auto& ev : events) cudaEventDestroy(ev);
  if (!error.empty() || times.empty()) {
    if (error.empty()) error = "no timed run";
    return -1.0;
  }
  std::sort(times.begin(), times.end());
  return static_cast<double>(times[times.size() / 2]);
}

}  // namespace

ConvPlanTimings graph_conv2d_time_plans(const ConvGeometry& g, const at::Tensor& x,
                                        const at::Tensor& w, const at::Tensor* b,
                                        const at::Tensor* r, at::Tensor& y, int64_t max_plans,
                                        int64_t reps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CallContext c = call_context(x);
  std::string refused;
  std::shared_ptr<fe::graph::Graph> graph;
  try {
    graph = candidate_graph(g, x, w, b, r, y, c.tf32, c.deterministic, c.workspace_limit,
                            c.handle, refused);
  } catch (const std::exception& ex) {
    refused = std::string("building the graph: ") + ex.what();
  }
  if (!graph) return {-1, refused, {}};
  std::unordered_map<int64_t, void*> pack = variant_pack(x, w, b, r, y);
  std::vector<PlanTimingRow> rows;
  // Candidates in cuDNN's order (heuristics A, then FALLBACK, which may repeat a config of A:
  // a repeat gets a row naming the first, unbuilt). conv2d's own plan (build_plans with
  // HEURISTICS_CHOICE) is the first candidate that builds: `chosen`. The ones conv2d's filters
  // deselect or that cuDNN does not support get a row with the reason; the first `max_plans`
  // that build are timed.
  const int64_t count = graph->get_execution_plan_count();
  int64_t built = 0, chosen = -1;
  std::unordered_map<std::string, int64_t> seen;
  for (int64_t i = 0; i < count && built < max_plans; ++i) {
    std::string name, error;
    int64_t ws = -1;
    double ms = -1.0;
    if (graph->get_plan_name_at_index(i, name).is_bad()) name = "?";
    const auto first = seen.emplace(name, i);
    if (!first.second && name != "?") {
      rows.emplace_back(i, name, ws, ms,
                        "duplicate of candidate " + std::to_string(first.first->second));
      continue;
    }
    try {
      fe::error_t e = graph->build_plan_at_index(i);
      if (e.is_bad()) {
        error = describe(e, "build");
      } else {
        ++built;
        if (chosen < 0) chosen = i;
        e = graph->get_workspace_size_plan_at_index(i, ws);
        if (e.is_bad()) {
          error = describe(e, "get_workspace_size");
        } else {
          at::Tensor workspace;
          if (ws > 0) workspace = at::empty({ws}, x.options().dtype(at::kByte));
          ms = time_candidate(*graph, i, c.handle, c.stream, pack,
                              ws > 0 ? workspace.mutable_data_ptr() : nullptr, reps, error);
        }
      }
    } catch (const c10::OutOfMemoryError&) {
      error = "out of memory";
    }
    rows.emplace_back(i, name, ws, ms, error);
  }
  return {chosen, "", rows};
}

int64_t graph_conv_cached_plans() { return plan_cache().size(); }

void graph_conv_clear_plans() { plan_cache().clear(); }

std::string graph_conv_build_info() {
  return "cudnn-frontend " + std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_PATCH_VERSION) + " (cuDNN headers " +
         std::to_string(CUDNN_MAJOR) + "." + std::to_string(CUDNN_MINOR) + ", runtime " +
         std::to_string(cudnnGetVersion()) + ")";
}

}  // namespace sdvae
