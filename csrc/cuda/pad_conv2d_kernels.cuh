// The kernels of sdvae::pad_conv2d's CUDA path: conv2d(F.pad(x, (left, right, top, bottom)),
// w, b, stride) with the zero border produced by predicated loads, so the padded input is never
// written.
//
// fp16 / bf16: an implicit GEMM on tensor cores (WMMA 16x16x16, fp32 accumulation).
//   GEMM view: M = N*OH*OW output pixels, N = Cout, K = KH*KW*C ordered (kh, kw, c). The weight is
//   reordered once per call to [Cout, KH, KW, C] (small), so a K slice of 8 consecutive values is
//   8 channels of one tap. One block of 8 warps computes a 128x128 output tile; each warp holds a
//   64x32 sub-tile in 4x2 accumulator fragments. K advances 32 at a time through a cp.async
//   pipeline of STAGES shared-memory buffers (20 KiB each; default 3 stages, 60 KiB, so two
//   blocks fit an SM on sm_80 and sm_90; rows padded to 40 elements so WMMA loads stay 32-byte
//   aligned). Three stages is CUTLASS's usual depth for this tile on sm_80; whether 2 or 4 is
//   faster on a given GPU is for the benchmark (SDVAE_PAD_CONV2D_STAGES, sdvae bench).
//   * NHWC input with C % 8 == 0 (the encoder's case, first-class): each thread issues 16-byte
//     cp.async copies straight into shared memory; a tap in the padding (or past M or K) is a
//     cp.async with src-size 0, which writes zeros — that is the whole padding logic.
//   * any other layout (NCHW included) or channel count: the same tile loop with predicated
//     scalar loads through the input's strides.
//   The epilogue adds the bias in fp32, rounds once and writes NHWC or NCHW by output strides
//   (NHWC with Cout % 8 == 0: one 16-byte store per 8 channels).
// fp32: a direct convolution, one thread per output, fp32 FMAs in the input's layout — simply
//   correct (no TF32), not tuned.
// All offsets are int64; launches use the current stream and are checked.
//
// References: NVIDIA CUTLASS "Implicit GEMM Convolution" (docs/implicit_gemm_convolution.md);
// CUDA C++ Programming Guide, "Warp Matrix Functions" (WMMA) and "Asynchronous Data Copies".
//
// This header holds the kernels and the host-side preparation; csrc/cuda/pad_conv2d.cu launches
// them. tests/cuda_emu/ compiles the same header as host C++ (SDVAE_CUDA_EMU, with its own
// threadIdx, barriers, cp.async and WMMA) to run the kernels' logic on a machine without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#ifndef SDVAE_CUDA_EMU
#include <mma.h>
#endif

namespace sdvae {
namespace pad_conv2d_detail {

#ifndef SDVAE_CUDA_EMU  // the emulator supplies its own cp.async
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#endif  // SDVAE_CUDA_EMU

struct ConvParams {
  int64_t N, C, H, W;              // input sizes
  int64_t Cout, KH, KW, OH, OW;    // weight / output sizes
  int64_t stride, pl, pt;          // stride, left and top padding
  int64_t xs_n, xs_c, xs_h, xs_w;  // input strides, elements
  int64_t os_n, os_c, os_h, os_w;  // output strides, elements
  int64_t M;                       // N * OH * OW
  int64_t K;                       // KH * KW * C
  bool out_vec;                    // tile kernel: 8 channels of a pixel are one 16-byte store
};

constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kBK = 32;
constexpr int kLds = kBK + 8;  // shared-memory row length (elements); multiple of 8 for WMMA
constexpr int kThreads = 256;
// The tile kernel's index maths is written for exactly this geometry: 8 warps in a 2 x 4 grid of
// 64 x 32 warp tiles, two 8-element chunks per thread per A / B tile, 16-wide WMMA steps.
static_assert(kBM == 128 && kBN == 128 && kThreads == 256, "warp layout assumes 128x128 / 8 warps");
static_assert(kBM * kBK == 2 * 8 * kThreads && kBN * kBK == 2 * 8 * kThreads, "2 chunks/thread");
static_assert(kBK % 16 == 0 && kLds % 8 == 0, "WMMA steps and 16-byte shared-memory rows");

// Shared memory of the tile kernel (dynamic: 3 or 4 stages need more than the 48 KiB a static
// array may have). The host emulator (tests/cuda_emu) defines its own, which hands every block
// a fresh, poisoned buffer.
#ifndef SDVAE_DYNAMIC_SHARED
#define SDVAE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif
constexpr int kDefaultStages = 3;

// Bytes of dynamic shared memory the tile kernel needs: the pipeline buffers, which the
// epilogue's 8 KiB of scratch reuses.
template <typename T>
constexpr int tc_shared_bytes(int stages) {
  return stages * (kBM + kBN) * kLds * static_cast<int>(sizeof(T));
}
static_assert(tc_shared_bytes<__half>(2) >= kThreads / 32 * 256 * 4, "epilogue scratch fits");

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// Implicit-GEMM tile kernel.
//   x:    input, [N, C, H, W] at strides p.xs_* (NHWC contiguous when VEC)
//   w:    weight reordered to [Cout, KH, KW, C], contiguous
//   bias: [Cout] fp32, or nullptr
//   out:  [N, Cout, OH, OW] at strides p.os_*
// VEC: x is NHWC with C % 8 == 0 and 16-byte aligned (16-byte cp.async for A and B tiles).
// STAGES: shared-memory pipeline depth (2..4); dynamic shared memory of tc_shared_bytes<T>(STAGES).
// __launch_bounds__(256, 2): at most 128 registers a thread, so two blocks share an SM.
template <typename T, bool VEC, int STAGES>
__global__ void __launch_bounds__(kThreads, 2)
    pad_conv2d_tc_kernel(const T* __restrict__ x, const T* __restrict__ w,
                         const float* __restrict__ bias, T* __restrict__ out, ConvParams p) {
  static_assert(STAGES >= 2 && STAGES <= 4, "pipeline depth");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  SDVAE_DYNAMIC_SHARED(smem_raw);
  T* As = reinterpret_cast<T*>(smem_raw);  // [STAGES][kBM][kLds]
  T* Bs = As + STAGES * kBM * kLds;        // [STAGES][kBN][kLds]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_m = warp / 4;  // 0..1: rows warp_m*64 .. +64
  const int warp_n = warp % 4;  // 0..3: cols warp_n*32 .. +32
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int Cin = static_cast<int>(p.C);
  const int KW = static_cast<int>(p.KW);
  const int K = static_cast<int>(p.K);
  const int OHW = static_cast<int>(p.OH * p.OW);
  const T zero = Cvt<T>::from_float(0.0f);

  // VEC: this thread's two 8-element chunks of each A / B tile: row = id / 4, k-chunk = id % 4.
  int64_t a_base[2];
  int a_ih0[2], a_iw0[2];
  bool a_ok[2];
  if constexpr (VEC) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int id = tid + i * kThreads;
      const int64_t m = m0 + id / 4;
      a_ok[i] = m < p.M;
      const int64_t mm = a_ok[i] ? m : 0;
      const int64_t img = mm / OHW;
      const int q = static_cast<int>(mm - img * OHW);
      const int oh = q / static_cast<int>(p.OW);
      const int ow = q - oh * static_cast<int>(p.OW);
      a_base[i] = img * p.xs_n;
      a_ih0[i] = oh * static_cast<int>(p.stride) - static_cast<int>(p.pt);
      a_iw0[i] = ow * static_cast<int>(p.stride) - static_cast<int>(p.pl);
    }
  }

  auto load_tiles = [&](int kt, int stage) {
    T* as = As + stage * kBM * kLds;
    T* bs = Bs + stage * kBN * kLds;
    if constexpr (VEC) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int id = tid + i * kThreads;
        const int row = id / 4;
        const int kc = (id % 4) * 8;
        const int k = kt * kBK + kc;
        // A: 8 channels of one tap of one output pixel; zeros (src-size 0) in the padding.
        const int rs = k / Cin;
        const int c = k - rs * Cin;
        const int r = rs / KW;
        const int s = rs - r * KW;
        const int ih = a_ih0[i] + r;
        const int iw = a_iw0[i] + s;
        const bool ok = a_ok[i] && k < K && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
        const T* src = ok ? x + a_base[i] + ih * p.xs_h + iw * p.xs_w + c : x;
        cp_async_16(as + row * kLds + kc, src, ok ? 16 : 0);
        // B: 8 consecutive K values of one output channel.
        const int64_t co = n0 + row;
        const bool okb = co < p.Cout && k < K;
        cp_async_16(bs + row * kLds + kc, okb ? w + co * p.K + k : w, okb ? 16 : 0);
      }
    } else {
#pragma unroll 4
      for (int i = 0; i < (kBM * kBK) / kThreads; ++i) {
        const int id = tid + i * kThreads;
        const int row = id % kBM;  // consecutive threads: consecutive pixels
        const int kk = id / kBM;
        const int k = kt * kBK + kk;
        const int64_t m = m0 + row;
        T v = zero;
        if (m < p.M && k < K) {
          const int64_t img = m / OHW;
          const int q = static_cast<int>(m - img * OHW);
          const int oh = q / static_cast<int>(p.OW);
          const int ow = q - oh * static_cast<int>(p.OW);
          const int rs = k / Cin;
          const int c = k - rs * Cin;
          const int r = rs / KW;
          const int s = rs - r * KW;
          const int64_t ih = static_cast<int64_t>(oh) * p.stride + r - p.pt;
          const int64_t iw = static_cast<int64_t>(ow) * p.stride + s - p.pl;
          if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
            v = x[img * p.xs_n + c * p.xs_c + ih * p.xs_h + iw * p.xs_w];
          }
        }
        as[row * kLds + kk] = v;
      }
#pragma unroll 4
      for (int i = 0; i < (kBN * kBK) / kThreads; ++i) {
        const int id = tid + i * kThreads;
        const int row = id / kBK;  // consecutive threads: consecutive K of one channel
        const int kk = id % kBK;
        const int k = kt * kBK + kk;
        const int64_t co = n0 + row;
        bs[row * kLds + kk] = (co < p.Cout && k < K) ? w[co * p.K + k] : zero;
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // Multistage pipeline: tiles kt+1 .. kt+STAGES-1 are in flight while tile kt is multiplied.
  // One commit group per tile (empty past the last), so "tile kt has landed" is always
  // wait_group<STAGES-2>. The one barrier per step both publishes tile kt to every warp and
  // tells every warp that all others are done with tile kt-1, whose stage is refilled next.
  const int KT = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_tiles(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_tiles(next, next % STAGES);
    cp_async_commit();
    const int stage = kt % STAGES;
    const T* as = As + stage * kBM * kLds + warp_m * 64 * kLds;
    const T* bs = Bs + stage * kBN * kLds + warp_n * 32 * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], as + i * 16 * kLds + kk, kLds);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bs + j * 16 * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain; drained before shared memory is reused
  __syncthreads();     // every warp is done with the last tile

  // Epilogue: each warp stages one 16x16 fragment at a time in its own 1 KiB of shared memory
  // (the pipeline buffers are free now), then lane l writes row l/2, columns (l%2)*8 .. +8.
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
  const int er = lane / 2;
  const int ec = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t m = m0 + warp_m * 64 + i * 16 + er;
      if (m < p.M) {
        const int64_t img = m / OHW;
        const int q = static_cast<int>(m - img * OHW);
        const int oh = q / static_cast<int>(p.OW);
        const int ow = q - oh * static_cast<int>(p.OW);
        T* o = out + img * p.os_n + oh * p.os_h + ow * p.os_w;
        const int64_t co0 = n0 + warp_n * 32 + j * 16 + ec;
        if (p.out_vec && co0 + 8 <= p.Cout) {
          // NHWC: this lane's 8 channels are 16 contiguous, 16-byte aligned bytes.
          T vals[8];
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            float v = scratch[er * 16 + ec + c];
            if (bias != nullptr) v += bias[co0 + c];
            vals[c] = Cvt<T>::from_float(v);
          }
          uint4 packed;
          memcpy(&packed, vals, sizeof(packed));
          *reinterpret_cast<uint4*>(o + co0) = packed;
        } else {
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            const int64_t co = co0 + c;
            if (co < p.Cout) {
              float v = scratch[er * 16 + ec + c];
              if (bias != nullptr) v += bias[co];
              o[co * p.os_c] = Cvt<T>::from_float(v);
            }
          }
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // tensor-core path needs sm_80+; the host never launches it below that
#endif
}

// Direct fp32 convolution, one thread per output element (grid-stride, int64 indices).
//   x: [N, C, H, W] at strides p.xs_*; w: [Cout, C, KH, KW] contiguous; bias: [Cout] or nullptr;
//   out: [N, Cout, OH, OW] at strides p.os_*. OUT_CL: enumerate outputs in NHWC order.
template <bool OUT_CL>
__global__ void pad_conv2d_f32_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ bias, float* __restrict__ out,
                                      ConvParams p) {
  const int64_t total = p.N * p.Cout * p.OH * p.OW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, co, oh, ow, rest = idx;
    if (OUT_CL) {
      co = rest % p.Cout;
      rest /= p.Cout;
      ow = rest % p.OW;
      rest /= p.OW;
      oh = rest % p.OH;
      n = rest / p.OH;
    } else {
      ow = rest % p.OW;
      rest /= p.OW;
      oh = rest % p.OH;
      rest /= p.OH;
      co = rest % p.Cout;
      n = rest / p.Cout;
    }
    float acc = bias != nullptr ? bias[co] : 0.0f;
    const float* wc = w + co * p.C * p.KH * p.KW;
    for (int64_t c = 0; c < p.C; ++c) {
      const float* xc = x + n * p.xs_n + c * p.xs_c;
      for (int64_t r = 0; r < p.KH; ++r) {
        const int64_t ih = oh * p.stride + r - p.pt;
        if (ih < 0 || ih >= p.H) continue;
        for (int64_t s = 0; s < p.KW; ++s) {
          const int64_t iw = ow * p.stride + s - p.pl;
          if (iw < 0 || iw >= p.W) continue;
          acc = fmaf(xc[ih * p.xs_h + iw * p.xs_w], wc[(c * p.KH + r) * p.KW + s], acc);
        }
      }
    }
    out[n * p.os_n + co * p.os_c + oh * p.os_h + ow * p.os_w] = acc;
  }
}

// ---- host side: everything a launch needs, shared by pad_conv2d.cu and the emulator ----------

inline bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

enum class Path { kF32Direct, kTensorCoreVec, kTensorCoreScalar };

struct Launch {
  ConvParams p;
  at::Tensor wk;    // weight as the kernel reads it: [Cout, KH, KW, C] (tensor cores) or as given
  at::Tensor b32;   // bias in fp32, or undefined
  Path path;
  bool out_cl;      // f32 kernel: enumerate outputs in NHWC order
  int stages;       // tile kernel: pipeline depth
  int smem_bytes;   // tile kernel: dynamic shared memory
  dim3 grid;
  unsigned threads;
};

// The tile kernel's pipeline depth: `requested` if non-zero, else SDVAE_PAD_CONV2D_STAGES from
// the environment (a benchmarking knob), else kDefaultStages.
inline int pick_stages(int requested) {
  int stages = requested;
  if (stages == 0) {
    const char* env = std::getenv("SDVAE_PAD_CONV2D_STAGES");
    stages = kDefaultStages;
    if (env != nullptr && env[0] != '\0') {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      stages = *end == '\0' && v > 0 && v < 100 ? static_cast<int>(v) : -1;  // -1: refused
    }
  }
  TORCH_CHECK(stages >= 2 && stages <= 4,
              "pad_conv2d: the pipeline depth (SDVAE_PAD_CONV2D_STAGES) must be 2, 3 or 4, got ",
              stages == -1 ? std::string(std::getenv("SDVAE_PAD_CONV2D_STAGES"))
                           : std::to_string(stages));
  return stages;
}

// `x` is NCHW- or NHWC-contiguous and `out` is allocated in the same memory format (both checked
// by csrc/pad_conv2d.cpp). Checks the limits the kernels' int32 indexing relies on. `stages`:
// see pick_stages.
inline Launch prepare_launch(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& out,
                             int64_t stride, int64_t pad_left, int64_t pad_top, int stages = 0) {
  Launch l{};
  ConvParams& p = l.p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.Cout = weight.size(0);
  p.KH = weight.size(2);
  p.KW = weight.size(3);
  p.OH = out.size(2);
  p.OW = out.size(3);
  p.stride = stride;
  p.pl = pad_left;
  p.pt = pad_top;
  p.xs_n = x.stride(0);
  p.xs_c = x.stride(1);
  p.xs_h = x.stride(2);
  p.xs_w = x.stride(3);
  p.os_n = out.stride(0);
  p.os_c = out.stride(1);
  p.os_h = out.stride(2);
  p.os_w = out.stride(3);
  p.M = p.N * p.OH * p.OW;
  p.K = p.KH * p.KW * p.C;
  if (bias.has_value()) l.b32 = bias->to(at::kFloat).contiguous();

  if (x.scalar_type() == at::kFloat) {
    l.path = Path::kF32Direct;
    l.wk = weight.contiguous();
    l.out_cl = p.os_c == 1 && p.Cout > 1;
    l.threads = 256;
    const int64_t total = p.N * p.Cout * p.OH * p.OW;
    const int64_t blocks = std::min<int64_t>((total + l.threads - 1) / l.threads, int64_t{1} << 20);
    l.grid = dim3(static_cast<unsigned>(blocks), 1, 1);
    return l;
  }
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "pad_conv2d: unsupported dtype ", x.scalar_type());
  constexpr int64_t kInt = int64_t{1} << 31;
  TORCH_CHECK(p.K + kBK < kInt && p.OH * p.OW < kInt && p.H < kInt && p.W < kInt,
              "pad_conv2d: per-image sizes beyond 2^31 are not supported");
  // The vector path keeps the first input row / column of a pixel's window in int32.
  TORCH_CHECK(p.OH * p.stride + p.KH < kInt && p.OW * p.stride + p.KW < kInt && p.pt < kInt &&
                  p.pl < kInt,
              "pad_conv2d: padding or stride too large");
  TORCH_CHECK((p.M + kBM - 1) / kBM < (int64_t{1} << 31) && (p.Cout + kBN - 1) / kBN < 65536,
              "pad_conv2d: output too large for one launch");
  // [Cout, KH, KW, C]: K ordered (kh, kw, c), matching the im2col order of the A tile.
  l.wk = weight.permute({0, 2, 3, 1}).contiguous();
  // 16-byte cp.async of 8 channels: channels contiguous, every pixel's first channel 16-byte
  // aligned (strides of dimensions with more than one element a multiple of 8 elements).
  auto stride_ok = [](int64_t size, int64_t stride) { return size == 1 || stride % 8 == 0; };
  const bool vec = p.xs_c == 1 && p.C % 8 == 0 && stride_ok(p.N, p.xs_n) &&
                   stride_ok(p.H, p.xs_h) && stride_ok(p.W, p.xs_w) &&
                   aligned16(x.const_data_ptr()) && aligned16(l.wk.const_data_ptr());
  l.path = vec ? Path::kTensorCoreVec : Path::kTensorCoreScalar;
  p.out_vec = p.os_c == 1 && p.Cout % 8 == 0 && stride_ok(p.N, p.os_n) &&
              stride_ok(p.OH, p.os_h) && stride_ok(p.OW, p.os_w) &&
              aligned16(out.const_data_ptr());
  l.stages = pick_stages(stages);
  l.smem_bytes = tc_shared_bytes<__half>(l.stages);  // 2-byte types: the same for bf16
  l.threads = kThreads;
  l.grid = dim3(static_cast<unsigned>((p.M + kBM - 1) / kBM),
                static_cast<unsigned>((p.Cout + kBN - 1) / kBN), 1);
  return l;
}

}  // namespace pad_conv2d_detail
}  // namespace sdvae
