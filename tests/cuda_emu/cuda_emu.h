// A host emulation of the few CUDA features sdvae's pad_conv2d kernels use, so that the kernels'
// own source (csrc/cuda/pad_conv2d_kernels.cuh) runs on a machine without a GPU.
//
// What it models, and how:
//   * one std::thread per CUDA thread of a block, reused for every block; the blocks run one
//     after another, so a kernel's __shared__ arrays (function-local statics here) belong to
//     one block at a time;
//   * __syncthreads / __syncwarp: real barriers over the block / the 32 lanes of a warp; a
//     barrier that not every thread reaches within a timeout is reported, not hung on;
//   * dynamic shared memory (SDVAE_DYNAMIC_SHARED in the kernel): the launch's byte count,
//     poisoned with 0xFF bytes (NaN) before every block starts;
//   * cp.async: a copy poisons its 16 destination bytes when issued and lands only at the
//     cp.async.wait_group that retires its group, so reading a stage before waiting for it, or
//     issuing a copy into a stage another warp still reads, gives NaN; addresses must be 16-byte
//     aligned and a copy with src-size > 0 must lie inside a buffer registered as readable;
//   * WMMA 16x16x16: a fragment is warp-level state held by lane 0; load/mma/store check the
//     documented pointer alignment (32 bytes) and leading dimension; products are exact and
//     accumulate in fp32, as on the tensor cores (summation order aside).
// What it does not model: timing, memory coalescing, bank conflicts, register pressure, the
// per-lane element layout of a fragment (the kernels never touch fragment elements), and
// reads of global memory by plain loads (tests surround buffers with NaN to catch those).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <type_traits>
#include <vector>

namespace cuda_emu {

// ---- errors: recorded by any thread, reported by the launcher ------------------------------
inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<std::pair<std::string, int64_t>>& errors() {  // message, times seen
  static std::vector<std::pair<std::string, int64_t>> e;
  return e;
}
inline void report(const std::string& what) {
  const std::lock_guard<std::mutex> lock(error_mutex());
  for (auto& e : errors()) {
    if (e.first == what) {
      ++e.second;
      return;
    }
  }
  errors().emplace_back(what, 1);
}
inline std::string error_summary() {
  std::string s;
  for (const auto& e : errors()) {
    s += (s.empty() ? "" : "; ") + e.first + " (x" + std::to_string(e.second) + ")";
  }
  return s;
}

// Which deliberate bug a mutated copy of a kernel should switch on (0: none). Only the tests'
// mutants read it: it shows that the emulator catches the class of bug each one plants.
inline int& mutant() {
  static int m = 0;
  return m;
}

// ---- buffers that cp.async may read ----------------------------------------------------------
struct Range {
  const char* begin;
  const char* end;
};
inline std::vector<Range>& readable() {
  static std::vector<Range> r;
  return r;
}
inline bool is_readable(const void* p, int bytes) {
  const char* c = static_cast<const char*>(p);
  for (const Range& r : readable()) {
    if (c >= r.begin && c + bytes <= r.end) return true;
  }
  return false;
}

// ---- barriers --------------------------------------------------------------------------------
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return gen_ != gen; })) {
      std::ostringstream s;
      s << what << ": only " << count_ << " of " << n_ << " threads arrived (divergent barrier)";
      report(s.str());
      --count_;
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_;
  int count_ = 0;
  uint64_t gen_ = 0;
};

struct Copy {
  void* dst;
  const void* src;
  int src_bytes;
};

// Shared memory of one block: the launch's dynamic shared memory, filled with 0xFF bytes (NaN
// in fp16, bf16 and fp32) before every block starts, as on a GPU, where it starts as garbage.
constexpr size_t kMaxSharedBytes = 166912;  // sm_80's opt-in limit per block (sm_90: 232448)

struct BlockState {
  BlockState(int threads, size_t shared_bytes) : block(threads), shared(shared_bytes + 128) {
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      const int lanes = std::min(32, threads - 32 * w);
      warps.emplace_back(new Barrier(lanes));
    }
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<unsigned char> shared;
  unsigned char* shared_base() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(shared.data());
    return shared.data() + (128 - p % 128) % 128;  // 128-byte aligned, as the kernel asks
  }
};

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int linear = 0;  // x + y*Dx + z*Dx*Dy
  BlockState* block = nullptr;
  std::vector<Copy> open;               // cp.async copies not yet committed
  std::deque<std::vector<Copy>> groups;  // committed, not yet waited for
};
inline ThreadState*& tls() {
  static thread_local ThreadState* t = nullptr;
  return t;
}
inline int lane() { return tls()->linear % 32; }

inline void syncthreads() { tls()->block->block.arrive_and_wait("__syncthreads"); }
inline void syncwarp() { tls()->block->warps[tls()->linear / 32]->arrive_and_wait("__syncwarp"); }
inline void trap() { report("__trap() was executed"); }
inline unsigned char* block_shared() { return tls()->block->shared_base(); }

// ---- cp.async --------------------------------------------------------------------------------
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    report("cp.async: a 16-byte copy with an address that is not 16-byte aligned");
    return;
  }
  if (src_bytes < 0 || src_bytes > 16) {
    report("cp.async: src-size outside [0, 16]");
    return;
  }
  if (src_bytes > 0 && !is_readable(gmem, src_bytes)) {
    report("cp.async: reads outside every input buffer");
    return;
  }
  // The copy may land any time before its wait_group: until then the destination holds
  // neither its old contents nor the new ones (0xFF bytes: NaN), so a stage that is still being
  // read when the next copy into it is issued shows up as NaN.
  std::memset(smem, 0xFF, 16);
  tls()->open.push_back({smem, gmem, src_bytes});
}
inline void cp_async_commit() {
  tls()->groups.push_back(std::move(tls()->open));
  tls()->open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& groups = tls()->groups;
  while (static_cast<int>(groups.size()) > N) {
    for (const Copy& c : groups.front()) {
      std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0,
                  static_cast<size_t>(16 - c.src_bytes));
    }
    groups.pop_front();
  }
}

// ---- launch: one std::thread per CUDA thread of a block; the blocks run one after another ----
template <typename Kernel>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Kernel&& kernel) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (shared_bytes > kMaxSharedBytes) report("dynamic shared memory over sm_80's 163 KiB");
  BlockState bs(threads, shared_bytes);
  Barrier between_blocks(threads);  // no thread starts block b+1 while b runs (shared memory)
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ThreadState ts;
      ts.thread_idx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      ts.block_dim = block;
      ts.grid_dim = grid;
      ts.linear = t;
      ts.block = &bs;
      tls() = &ts;
      for (uint64_t b = 0; b < blocks; ++b) {
        if (t == 0) std::memset(bs.shared.data(), 0xFF, bs.shared.size());
        between_blocks.arrive_and_wait("start of block");
        const uint64_t plane = static_cast<uint64_t>(grid.x) * grid.y;
        ts.block_idx = make_uint3(static_cast<unsigned>(b % grid.x),
                                  static_cast<unsigned>((b / grid.x) % grid.y),
                                  static_cast<unsigned>(b / plane));
        kernel();
        if (!ts.open.empty() || !ts.groups.empty()) {
          report("a thread exited with cp.async copies it never waited for");
          ts.open.clear();
          ts.groups.clear();
        }
        between_blocks.arrive_and_wait("end of block");
      }
      tls() = nullptr;
    });
  }
  for (std::thread& th : pool) th.join();
}

}  // namespace cuda_emu

// ---- WMMA: warp-level fragments held by lane 0 -----------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  float v[16][16];  // matrix_a: [m][k], matrix_b: [k][n], accumulator: [m][n]
  static_assert(M == 16 && N == 16 && K == 16, "the emulator models 16x16x16 fragments only");
};

inline bool wmma_ptr_ok(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    cuda_emu::report(std::string(what) + ": pointer not 32-byte aligned");
    return false;
  }
  if ((ldm * elem) % 16 != 0) {
    cuda_emu::report(std::string(what) + ": ldm is not a multiple of 16 bytes");
    return false;
  }
  return true;
}

template <typename T>
float to_f(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  if (cuda_emu::lane() != 0) return;
  if (!wmma_ptr_ok(p, ldm, sizeof(T), "wmma::load_matrix_sync")) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      // The fragment's row index r: m for matrix_a, k for matrix_b; c: k for a, n for b.
      const bool row = std::is_same_v<Layout, row_major>;
      f.v[r][c] = to_f(row ? p[r * ldm + c] : p[c * ldm + r]);
    }
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float value) {
  if (cuda_emu::lane() != 0) return;
  for (auto& row : f.v) {
    for (float& x : row) x = value;
  }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  if (cuda_emu::lane() != 0) return;
  float out[16][16];
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < 16; ++k) acc += a.v[m][k] * b.v[k][n];  // exact products of 16-bit values
      out[m][n] = acc;
    }
  }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  if (cuda_emu::lane() != 0) return;
  if (!wmma_ptr_ok(p, ldm, sizeof(float), "wmma::store_matrix_sync")) return;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      (layout == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.v[m][n];
    }
  }
}
}  // namespace wmma
}  // namespace nvcuda

// ---- the CUDA keywords, for kernel source compiled as host C++ ---------------------------------
// Included after cuda_fp16.h / cuda_bf16.h, whose host paths must not see __CUDA_ARCH__.
#undef __shared__
#define __shared__ static  // not poisoned: kernels here declare shared memory with the macro below
#define SDVAE_DYNAMIC_SHARED(name) unsigned char* name = cuda_emu::block_shared()
#define __launch_bounds__(...)
#define __CUDA_ARCH__ 800
#define threadIdx (cuda_emu::tls()->thread_idx)
#define blockIdx (cuda_emu::tls()->block_idx)
#define blockDim (cuda_emu::tls()->block_dim)
#define gridDim (cuda_emu::tls()->grid_dim)
#define __syncthreads() cuda_emu::syncthreads()
#define __syncwarp(...) cuda_emu::syncwarp()
#define __trap() cuda_emu::trap()
