// Shared declarations of sdvae::conv2d / sdvae::pad_conv2d (csrc/conv2d.cpp, csrc/pad_conv2d.cpp,
// csrc/cuda/conv2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
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

// May cuDNN convolutions use TF32? torch's own switch for convolutions: the per-operator one
// (torch >= 2.9, `torch.backends.cudnn.conv.fp32_precision`), else the legacy
// `torch.backends.cudnn.allow_tf32`. Never the op-less getter of torch >= 2.9, which raises once a
// program has set the convolution and RNN switches apart.
bool cudnn_conv_allows_tf32();

// cuDNN indexes a tensor in 32 bits: no tensor handed to it may have 2^31 elements or more. The
// batch chunks (sizes, in order, summing to n) that keep every chunk's input and output under
// that, given the elements of one sample of each; as few chunks as possible, all but the last
// of the same size. Empty when one sample alone reaches 2^31 elements (no split helps).
std::vector<int64_t> conv2d_batch_chunks(int64_t n, int64_t in_per_sample,
                                         int64_t out_per_sample);

// One attempt at a cuDNN graph: it ran; cuDNN refused it (for good: the refusal is cached and
// the same graph is never tried again); or it failed for now (out of memory while building the
// plan or allocating its workspace: not cached, the next call tries again).
enum class GraphOutcome { kRan, kRefused, kTransient };
struct GraphAttempt {
  GraphOutcome outcome;
  std::string why;  // empty when it ran
};
// Whether a cuDNN / CUDA failure message is a transient one (an allocation that failed).
bool conv2d_failure_is_transient(const std::string& message);

// The fallback ladder of one conv: the fused graph (bias and residual in its epilogue) when
// `fused` is asked for, else or when that fails the bare graph (the caller then adds bias and
// residual with ATen), else eager. try_graph(fused) runs one graph. Returns the path taken and,
// in *why, what failed on the way (empty for the first choice).
enum class ConvPath { kFusedGraph, kBareGraph, kEager };
ConvPath conv2d_ladder(bool fused, const std::function<GraphAttempt(bool fused)>& try_graph,
                       std::string* why);

// The largest cuDNN workspace a plan may ask for, in bytes: the calling thread's scoped limit
// when one is set (conv2d_set_workspace_limit), else SDVAE_CONV_WORKSPACE_LIMIT (bytes, or with
// a KiB / MiB / GiB suffix; ValueError naming the variable otherwise), default 1 GiB. Engines
// that want more are filtered out before a plan is chosen; when none is left, cuDNN refuses the
// graph and the ladder goes on. The limit is part of the plan cache's key.
constexpr int64_t kDefaultWorkspaceLimit = int64_t{1} << 30;
int64_t conv2d_workspace_limit();
// Sets the calling thread's limit (bytes >= 0), or clears it (-1: back to the environment's);
// returns the previous setting (-1 when none was set). Python: sdvae.ops.workspace_limit.
int64_t conv2d_set_workspace_limit(int64_t bytes);

// The cuDNN plan cache's policy, apart from cuDNN itself (so that it is testable without a GPU):
// one entry per (cuDNN handle, key). torch hands each thread its own cuDNN handle per device, so
// a plan is only ever executed by the thread that owns its handle (execution plans are not
// guaranteed thread-safe across engines; PyTorch keeps its own cuDNN plans per thread too). A
// refusal is cached; a transient failure is not. Plans are built outside the lock: two threads
// never share a key, since their handles differ.
template <typename Plan>  // Plan: a `bool transient` member
class PlanCache {
 public:
  using Key = std::vector<int64_t>;

  // The plan for (handle, key), built with build() -> std::shared_ptr<Plan> on a miss; *built
  // says whether build() ran.
  template <typename Build>
  std::shared_ptr<Plan> get_or_build(const void* handle, Key key, Build&& build, bool* built) {
    key.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(handle)));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = plans_.find(key);
      if (it != plans_.end()) {
        *built = false;
        return it->second;
      }
    }
    std::shared_ptr<Plan> plan = build();
    *built = true;
    if (!plan->transient) {
      std::lock_guard<std::mutex> lock(mutex_);
      plans_.emplace(std::move(key), plan);
    }
    return plan;
  }

  int64_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(plans_.size());
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    plans_.clear();
  }

 private:
  mutable std::mutex mutex_;
  std::map<Key, std::shared_ptr<Plan>> plans_;
};

// Test hooks (sdvae._C, for tests/test_conv2d.py): the ladder driven by scripted outcomes
// ("ran" / "refused" / "transient", one per attempt) -> (path, why, the attempts' `fused`), and a
// PlanCache driven by (handle, key, outcome) steps -> whether each step built a plan.
std::tuple<std::string, std::string, std::vector<bool>> conv2d_ladder_probe(
    bool fused, const std::vector<std::string>& outcomes);
std::vector<bool> plan_cache_probe(
    const std::vector<std::tuple<int64_t, int64_t, std::string>>& steps);

// Bookkeeping (csrc/conv2d.cpp): plans built / refused / failed for now, and the fallback reasons.
void conv2d_note_plan_built(GraphOutcome outcome);
void conv2d_record_fallback(const std::string& reason);
std::vector<std::string> conv2d_fallbacks();
void conv2d_reset_stats();
// {plans built, graphs refused, transient failures, plans cached}
std::vector<int64_t> conv2d_stats();
bool graph_conv_available();
std::string conv2d_build_info();

// Every execution plan cuDNN offers for one conv2d call, each built and timed (for
// sdvae.bench.tune, on a GPU): (the index of the candidate conv2d itself takes, -1 if none
// builds; cuDNN's refusal of the whole graph, else ""; one row per candidate in cuDNN's order:
// (index, plan name, workspace bytes, median ms, error)), until `max_plans` have built. A
// candidate deselected by conv2d's filters, unsupported, repeated, or failing to build or run
// has ms -1 and the reason. A CUDA error while timing is thrown.
using PlanTimingRow = std::tuple<int64_t, std::string, int64_t, double, std::string>;
using ConvPlanTimings = std::tuple<int64_t, std::string, std::vector<PlanTimingRow>>;
ConvPlanTimings conv2d_time_plans(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual, int64_t stride,
                                  std::vector<int64_t> padding, bool fuse_epilogue,
                                  int64_t max_plans, int64_t reps);

#ifdef SDVAE_WITH_CUDNN_FE
// csrc/cuda/conv2d.cpp: the cuDNN graph (fused: b and r, either may be null, in the epilogue;
// else the bare conv). y is allocated by the caller and untouched unless the graph ran.
// Throws when a built plan fails to execute.
GraphAttempt graph_conv2d_cuda(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor* b, const at::Tensor* r, at::Tensor& y);
// The timing of every candidate plan (conv2d_time_plans), on the same filters as the plan
// graph_conv2d_cuda builds; nothing is cached.
ConvPlanTimings graph_conv2d_time_plans(const ConvGeometry& g, const at::Tensor& x,
                                        const at::Tensor& w, const at::Tensor* b,
                                        const at::Tensor* r, at::Tensor& y, int64_t max_plans,
                                        int64_t reps);
int64_t graph_conv_cached_plans();
void graph_conv_clear_plans();
std::string graph_conv_build_info();
#endif

}  // namespace sdvae
