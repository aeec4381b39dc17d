// sdvae::pad_conv2d — a 2-D convolution with asymmetric zero padding, without the padded copy.
//
// Computes out = conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride) for groups = 1,
// dilation = 1, any kernel size, any stride >= 1 and any non-negative padding. The encoder of the
// SD VAE pads by (0, 1, 0, 1) before each stride-2 3x3 downsample conv; eager PyTorch writes the
// whole padded activation to memory just to add one row and one column of zeros. Here the border
// is produced while the input is read, so the padded tensor never exists.
//
// CPU strategy (this file). Outputs of at least 4x4 pixels: ATen's own convolution of x itself
// (at::conv2d, which runs oneDNN on the CPU like eager does) with a symmetric padding that oneDNN
// applies inside the convolution, chosen congruent to (top, left) modulo the stride and at least
// as large as every side, so that its outputs are a superset of ours on the same grid; our
// outputs are then copied out of it (no copy when the padding is already symmetric). For the
// encoder's (0, 1, 0, 1) and stride 2 that is padding 2: one extra output row and column
// (0.4-1.6 % more work) and one output-sized copy (a quarter of the input), against eager's
// padded copy of the whole input. The padded input is never written anywhere.
//   Measured against eager (F.pad + F.conv2d) on the encoder's fp32 NCHW shapes (128ch 512²,
// 256ch 256², 512ch 128²), 2-core VM shared with other jobs, `sdvae bench pad_conv2d
// --rep-ms 2000` twice: 1.27x / 1.14x / 1.18x and 1.20x / 1.18x / 1.16x. Interleaved by hand:
// 1.34x / 1.25x / 1.17x fp32 NCHW, 1.46x / 1.33x / 1.14x fp32 channels_last, 1.55x / 1.45x /
// 1.32x bf16 channels_last, 1.20x / 1.46x / 1.22x bf16 NCHW. The
// tiled im2col kernel below, which these replaced on such shapes, measured 0.61-0.73x: oneDNN's
// convolution is simply much faster than im2col + GEMM here.
//   An interior/border split was also built and measured: ATen on the outputs whose receptive
// field lies inside x (padding 0, then the same copy), the last row and column through the tiled
// kernel. It reached 1.01-1.23x and lost to the padded ATen call in interleaved runs by 5-15 %:
// the border GEMM runs far below oneDNN's rate and its parallel regions each cost milliseconds
// of thread wake-up on this VM, more than one extra row and column of oneDNN work.
//
// Smaller outputs, or paddings so lopsided that ATen would do over twice our work: an explicit
// GEMM over output tiles. The output pixels of one image are cut into tiles of P consecutive
// pixels. Tiles go in chunks of T (a multiple of the thread count, about 8 MiB of im2col per
// chunk, so each parallel region and BLAS call has enough work):
// at::parallel_for gathers the im2col matrix of each tile of the chunk (taps that fall in the
// padding are written as zeros; nothing outside the tile is read), one at::mm multiplies the
// chunk's columns with the weight matrix, and at::parallel_for again adds the bias and writes each
// tile in the output's dtype and layout. The GEMM sits between the two parallel regions rather
// than inside them because the CPU BLAS threads itself: called from inside at::parallel_for it
// nests a second thread team on the same cores (measured: several times slower on 2 cores).
// P is chosen so that one tile's im2col block is about 1 MiB (L2-resident). Tile layouts follow
// the input's memory format:
//   * NCHW:  col[K, P] with K ordered (c, kh, kw), out_tile[Cout, P] = W[Cout, K] @ col.
//   * NHWC:  col[P, K] with K ordered (kh, kw, c) — each tap is one contiguous run of C values —
//            and out_tile[P, Cout] = col @ W^T[K, Cout], which is already the NHWC output order.
// fp16 and bf16 inputs are widened to fp32 while gathering; the GEMM accumulates in fp32 and each
// output is rounded once.
//
// CUDA: the cuDNN graph conv of sdvae::conv2d (csrc/conv2d.cpp, csrc/cuda/conv2d.cpp), with the
// padding as the conv's pre (top, left) / post (bottom, right) padding: no padded copy either. A
// hand-written tensor-core kernel lived here before; on an H200 it ran at 0.27-0.54x of cuDNN on
// an already padded input at every shape, and was removed.
// The fake (meta) implementation and the argument checks users see first live in sdvae/ops.py.
//
// References: K. Chellapilla et al., "High Performance Convolutional Neural Networks for Document
// Processing" (2006) for im2col + GEMM; PyTorch's slow_conv2d (aten/src/ATen/native/ConvolutionMM2d.cpp)
// for the whole-image variant this tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "conv2d.h"

namespace sdvae {

namespace {

using Geometry = ConvGeometry;

// Argument checks shared by the CPU and CUDA entries (csrc/conv2d.cpp, with no residual):
// ValueError / TypeError naming the argument.
Geometry check_args(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, int64_t stride,
                    at::IntArrayRef padding) {
  return conv2d_check_args("pad_conv2d", x, weight, bias, std::nullopt, stride, padding);
}

at::Tensor empty_output(const Geometry& g, const at::Tensor& x) {
  return at::empty({g.N, g.Cout, g.OH, g.OW}, x.options().memory_format(
      g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

// Output pixels [q0, q0 + P) of one image, NCHW input `xn` ([C, H, W]) -> col[K, P] (fp32, row
// stride ld), K ordered (c, kh, kw); taps in the padding are zeros.
template <typename scalar_t>
void im2col_nchw(const scalar_t* xn, float* col, int64_t ld, int64_t q0, int64_t P,
                 const Geometry& g) {
  const int64_t s = g.stride;
  int64_t k = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* xc = xn + c * g.H * g.W;
    for (int64_t r = 0; r < g.KH; ++r) {
      for (int64_t t = 0; t < g.KW; ++t, ++k) {
        float* dst = col + k * ld;
        // ow such that 0 <= ow * s + t - pl < W, as [lo, hi).
        const int64_t lo_num = g.pl - t;
        const int64_t lo = lo_num <= 0 ? 0 : (lo_num + s - 1) / s;
        const int64_t hi_num = g.W - 1 - t + g.pl;
        const int64_t hi = hi_num < 0 ? 0 : hi_num / s + 1;
        int64_t p = 0, q = q0;
        while (p < P) {
          const int64_t oh = q / g.OW, ow0 = q % g.OW;
          const int64_t len = std::min(g.OW - ow0, P - p);
          const int64_t ih = oh * s + r - g.pt;
          float* d = dst + p;
          if (ih < 0 || ih >= g.H) {
            std::fill(d, d + len, 0.0f);
          } else {
            const scalar_t* src = xc + ih * g.W + t - g.pl;  // src[ow * s] is x[c, ih, iw]
            const int64_t a = std::clamp(lo, ow0, ow0 + len), b = std::clamp(hi, a, ow0 + len);
            std::fill(d, d + (a - ow0), 0.0f);
            if (s == 1) {
              for (int64_t ow = a; ow < b; ++ow) d[ow - ow0] = static_cast<float>(src[ow]);
            } else {
              for (int64_t ow = a; ow < b; ++ow) d[ow - ow0] = static_cast<float>(src[ow * s]);
            }
            std::fill(d + (b - ow0), d + len, 0.0f);
          }
          p += len;
          q += len;
        }
      }
    }
  }
}

// Output pixels [q0, q0 + P) of one image, NHWC input `xn` ([H, W, C]) -> col[P, K] (fp32),
// K ordered (kh, kw, c); taps in the padding are zeros.
template <typename scalar_t>
void im2col_nhwc(const scalar_t* xn, float* col, int64_t q0, int64_t P, const Geometry& g) {
  const int64_t K = g.KH * g.KW * g.C;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t q = q0 + p, oh = q / g.OW, ow = q % g.OW;
    float* row = col + p * K;
    for (int64_t r = 0; r < g.KH; ++r) {
      const int64_t ih = oh * g.stride + r - g.pt;
      for (int64_t t = 0; t < g.KW; ++t) {
        const int64_t iw = ow * g.stride + t - g.pl;
        float* d = row + (r * g.KW + t) * g.C;
        if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) {
          std::fill(d, d + g.C, 0.0f);
        } else {
          const scalar_t* src = xn + (ih * g.W + iw) * g.C;
          if constexpr (std::is_same_v<scalar_t, float>) {
            std::memcpy(d, src, sizeof(float) * g.C);
          } else {
            for (int64_t c = 0; c < g.C; ++c) d[c] = static_cast<float>(src[c]);
          }
        }
      }
    }
  }
}

// Pixels per tile: the im2col tile (K x P fp32) near 1 MiB, at least 16 and at most one image.
int64_t tile_pixels(int64_t K, int64_t OHW) {
  const int64_t target = (int64_t{1} << 18) / std::max<int64_t>(K, 1);
  int64_t P = std::max<int64_t>(16, target / 16 * 16);
  return std::min(P, OHW);
}

template <typename scalar_t>
void pad_conv2d_cpu_kernel(const at::Tensor& x, const at::Tensor& wmat, const float* bias,
                           at::Tensor& out, const Geometry& g) {
  const int64_t K = g.C * g.KH * g.KW;
  const int64_t OHW = g.OH * g.OW;
  const int64_t P = tile_pixels(K, OHW);
  const int64_t tiles_per_image = (OHW + P - 1) / P;
  const int64_t tiles = g.N * tiles_per_image;
  // Tiles per chunk: a multiple of the thread count, about 8 MiB of im2col in all, so that each
  // BLAS call (and each parallel region) has enough work to amortise its thread start-up.
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t per_thread = std::max<int64_t>(1, (int64_t{1} << 21) / (threads * P * K));
  const int64_t T = std::min<int64_t>(threads * per_thread, tiles);
  const int64_t cols = T * P;  // GEMM columns per chunk of T tiles
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t Cout = g.Cout;
  // Zero-initialised, so the unused columns of a short last tile hold zeros, not garbage.
  at::Tensor col = at::zeros({g.channels_last ? cols : K, g.channels_last ? K : cols},
                             at::TensorOptions().dtype(at::kFloat));
  at::Tensor acc = g.channels_last ? at::empty({cols, Cout}, col.options())
                                   : at::empty({Cout, cols}, col.options());
  float* colp = col.mutable_data_ptr<float>();
  const float* accp = acc.const_data_ptr<float>();

  for (int64_t c0 = 0; c0 < tiles; c0 += T) {
    const int64_t c1 = std::min(c0 + T, tiles);
    // Gather: tile j of the chunk owns columns (NCHW) or rows (NHWC) [j * P, j * P + P).
    at::parallel_for(c0, c1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n = tile / tiles_per_image, q0 = (tile % tiles_per_image) * P;
        const int64_t np = std::min(P, OHW - q0), j = tile - c0;
        const scalar_t* xn = xp + n * g.C * g.H * g.W;
        if (g.channels_last) {
          im2col_nhwc<scalar_t>(xn, colp + j * P * K, q0, np, g);
        } else {
          im2col_nchw<scalar_t>(xn, colp + j * P, cols, q0, np, g);
        }
      }
    });
    // One GEMM per chunk, outside the parallel region: the BLAS threads itself, and a BLAS
    // call inside at::parallel_for would nest a second thread team on the same cores.
    const int64_t used = (c1 - c0) * P;
    if (g.channels_last) {
      at::Tensor a = acc.narrow(0, 0, used);
      at::mm_out(a, col.narrow(0, 0, used), wmat);
    } else {
      at::Tensor a = acc.narrow(1, 0, used);
      at::mm_out(a, wmat, col.narrow(1, 0, used));
    }
    // Epilogue: bias in fp32, one rounding to the output dtype.
    at::parallel_for(c0, c1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n = tile / tiles_per_image, q0 = (tile % tiles_per_image) * P;
        const int64_t np = std::min(P, OHW - q0), j = tile - c0;
        if (g.channels_last) {
          scalar_t* o = op + (n * OHW + q0) * Cout;
          for (int64_t p = 0; p < np; ++p) {
            const float* a = accp + (j * P + p) * Cout;
            scalar_t* d = o + p * Cout;
            if (bias != nullptr) {
              for (int64_t co = 0; co < Cout; ++co) d[co] = static_cast<scalar_t>(a[co] + bias[co]);
            } else {
              for (int64_t co = 0; co < Cout; ++co) d[co] = static_cast<scalar_t>(a[co]);
            }
          }
        } else {
          scalar_t* o = op + n * Cout * OHW + q0;
          for (int64_t co = 0; co < Cout; ++co) {
            const float* a = accp + co * cols + j * P;
            const float b = bias != nullptr ? bias[co] : 0.0f;
            scalar_t* d = o + co * OHW;
            for (int64_t p = 0; p < np; ++p) d[p] = static_cast<scalar_t>(a[p] + b);
          }
        }
      }
    });
  }
}

// ATen's convolution of the whole, unpadded x with symmetric padding `pad` along one dimension
// (rows or columns): its output j reads from j * s - pad, our output o from o * s - lo. With pad
// congruent to lo modulo s, its output j is our output j - skip, skip = (pad - lo) / s, and as
// both read zeros outside x, each of its outputs that is one of ours is exact. pad is the
// smallest such value that is >= lo and >= hi; then its outputs include all of ours, plus `skip`
// leading ones and at most one trailing one that are not: about |hi - lo| / s rows or columns.
struct Cover {
  int64_t pad;   // symmetric padding handed to at::conv2d
  int64_t skip;  // its leading outputs that are not ours
  int64_t size;  // its output size
};

Cover aten_cover(int64_t size, int64_t k, int64_t s, int64_t lo, int64_t hi) {
  const int64_t pad = lo + s * ((std::max<int64_t>(hi - lo, 0) + s - 1) / s);
  return {pad, (pad - lo) / s, (size + 2 * pad - k) / s + 1};
}

// ATen's convolution is used when our output is at least this many pixels high and wide and
// ATen's outputs that are not ours at most double the work. Smaller outputs go to the tiled
// kernel: there a library call does not pay, and this keeps oneDNN off degenerate shapes (this
// torch build's bf16 stride-2 convolution returns garbage for one-pixel-wide outputs, e.g.
// 1x64x31x3 -> 15x1).
constexpr int64_t kMinAtenOutput = 4;

}  // namespace

at::Tensor pad_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t stride,
                          at::IntArrayRef padding) {
  const Geometry g = check_args(x_in, weight, bias, stride, padding);
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "pad_conv2d: x must be a CPU tensor here, got ",
                    x_in.device());
  const at::Tensor x = x_in.contiguous(g.channels_last ? at::MemoryFormat::ChannelsLast
                                                       : at::MemoryFormat::Contiguous);
  at::Tensor out = empty_output(g, x);
  if (out.numel() == 0) return out;
  const Cover rows = aten_cover(g.H, g.KH, g.stride, g.pt, g.pb);
  const Cover cols = aten_cover(g.W, g.KW, g.stride, g.pl, g.pr);
  if (g.OH >= kMinAtenOutput && g.OW >= kMinAtenOutput &&
      rows.size * cols.size <= 2 * g.OH * g.OW) {
    // ATen's own convolution of x (oneDNN on the CPU, as eager uses), padded inside the
    // convolution; then our outputs out of its own. It is inference only, whatever the grad mode.
    const at::NoGradGuard no_grad;
    const at::Tensor y = at::conv2d(x, weight, bias, {g.stride, g.stride}, {rows.pad, cols.pad});
    if (y.sizes() == out.sizes() && y.strides() == out.strides()) return y;
    out.copy_(y.narrow(2, rows.skip, g.OH).narrow(3, cols.skip, g.OW));
    return out;
  }
  const int64_t K = g.C * g.KH * g.KW;
  // Weight as an fp32 GEMM operand: [Cout, K] with K = (c, kh, kw) for NCHW tiles, [K, Cout]
  // with K = (kh, kw, c) for NHWC tiles. Small next to the activations; built once per call.
  const at::Tensor w32 = weight.detach().to(at::kFloat);
  const at::Tensor wmat = g.channels_last
                              ? w32.permute({2, 3, 1, 0}).reshape({K, g.Cout}).contiguous()
                              : w32.reshape({g.Cout, K}).contiguous();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->detach().to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pad_conv2d_cpu",
                                  [&] { pad_conv2d_cpu_kernel<scalar_t>(x, wmat, bp, out, g); });
  return out;
}

#ifdef SDVAE_WITH_CUDA
namespace {
at::Tensor pad_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t stride,
                           at::IntArrayRef padding) {
  return conv2d_cuda_run("pad_conv2d", x, weight, bias, std::nullopt, stride, padding, true);
}
}  // namespace
#endif

}  // namespace sdvae

TORCH_LIBRARY_IMPL(sdvae, CPU, m) { m.impl("pad_conv2d", &sdvae::pad_conv2d_cpu); }

#ifdef SDVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(sdvae, CUDA, m) { m.impl("pad_conv2d", &sdvae::pad_conv2d_cuda); }
#endif
