// Runs csrc/cuda/pad_conv2d_kernels.cuh, unchanged, on the CPU through cuda_emu.h.
// Op: <ns>::pad_conv2d(x, weight, bias, out, stride, pad_left, pad_top, stages=0) -> str
//   does what csrc/cuda/pad_conv2d.cu's launcher does (prepare_launch, then the kernel the
//   launch picks; stages 0 = the default or SDVAE_PAD_CONV2D_STAGES) and returns "<path>" or
//   "<path>: <errors the emulator recorded>"; a tile-kernel path ends in "/<n>stages/store16"
//   or ".../store2" (the epilogue's 16-byte or 2-byte stores).
//   `x` and `out` follow the real launcher's contract: the same memory format, NCHW- or
//   NHWC-contiguous. cp.async may read `x` and the prepared weight, nothing else.
// Op: <ns>::set_mutant(m): the bug a mutated kernel copy plants (tests only).
// ATen first: its headers must not see the CUDA keywords cuda_emu.h defines.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

namespace sdvae {
namespace pad_conv2d_detail {
using cuda_emu::cp_async_16;
using cuda_emu::cp_async_commit;
using cuda_emu::cp_async_wait;
}  // namespace pad_conv2d_detail
}  // namespace sdvae

#include "pad_conv2d_kernels.cuh"

namespace {

using sdvae::pad_conv2d_detail::Launch;
using sdvae::pad_conv2d_detail::Path;

cuda_emu::Range range_of(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const char* begin = static_cast<const char*>(t.const_data_ptr());
  return {begin, begin + (last + 1) * t.element_size()};
}

template <typename T, bool VEC, int STAGES>
void run_tc_kernel(const T* xp, const T* wp, const float* bias, T* op, const Launch& l) {
  const auto p = l.p;
  cuda_emu::launch(l.grid, dim3(l.threads), static_cast<size_t>(l.smem_bytes), [&] {
    sdvae::pad_conv2d_detail::pad_conv2d_tc_kernel<T, VEC, STAGES>(xp, wp, bias, op, p);
  });
}

template <typename T, bool VEC>
void run_tc_stages(const T* xp, const T* wp, const float* bias, T* op, const Launch& l) {
  if (l.stages == 2) {
    run_tc_kernel<T, VEC, 2>(xp, wp, bias, op, l);
  } else if (l.stages == 3) {
    run_tc_kernel<T, VEC, 3>(xp, wp, bias, op, l);
  } else {
    run_tc_kernel<T, VEC, 4>(xp, wp, bias, op, l);
  }
}

template <typename T>
void run_tc(const at::Tensor& x, const Launch& l, const float* bias, const at::Tensor& out) {
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  const T* wp = reinterpret_cast<const T*>(l.wk.const_data_ptr());
  T* op = reinterpret_cast<T*>(out.mutable_data_ptr());
  if (l.path == Path::kTensorCoreVec) {
    run_tc_stages<T, true>(xp, wp, bias, op, l);
  } else {
    run_tc_stages<T, false>(xp, wp, bias, op, l);
  }
}

std::string emulate(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& out, int64_t stride,
                    int64_t pad_left, int64_t pad_top, int64_t stages) {
  static std::mutex one_at_a_time;  // the emulator's state (errors, readable, __shared__) is global
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "the emulator runs on CPU tensors");
  cuda_emu::errors().clear();
  const Launch l = sdvae::pad_conv2d_detail::prepare_launch(x, weight, bias, out, stride,
                                                            pad_left, pad_top,
                                                            static_cast<int>(stages));
  cuda_emu::readable() = {range_of(x), range_of(l.wk)};
  const float* bp = l.b32.defined() ? l.b32.const_data_ptr<float>() : nullptr;
  std::string path;
  switch (l.path) {
    case Path::kF32Direct: {
      path = l.out_cl ? "f32_direct_nhwc" : "f32_direct_nchw";
      const float* xp = x.const_data_ptr<float>();
      const float* wp = l.wk.const_data_ptr<float>();
      float* op = out.mutable_data_ptr<float>();
      const auto p = l.p;
      cuda_emu::launch(l.grid, dim3(l.threads), 0, [&] {
        if (l.out_cl) {
          sdvae::pad_conv2d_detail::pad_conv2d_f32_kernel<true>(xp, wp, bp, op, p);
        } else {
          sdvae::pad_conv2d_detail::pad_conv2d_f32_kernel<false>(xp, wp, bp, op, p);
        }
      });
      break;
    }
    case Path::kTensorCoreVec:
    case Path::kTensorCoreScalar:
      path = l.path == Path::kTensorCoreVec ? "tensor_core_vec" : "tensor_core_scalar";
      path += "/" + std::to_string(l.stages) + "stages";
      path += l.p.out_vec ? "/store16" : "/store2";
      if (x.scalar_type() == at::kHalf) {
        run_tc<__half>(x, l, bp, out);
      } else {
        run_tc<__nv_bfloat16>(x, l, bp, out);
      }
      break;
  }
  cuda_emu::readable().clear();
  const std::string errors = cuda_emu::error_summary();
  return errors.empty() ? path : path + ": " + errors;
}

void set_mutant(int64_t m) { cuda_emu::mutant() = static_cast<int>(m); }

}  // namespace

// The op namespace: a build of a mutated kernel copy gets its own (-DSDVAE_EMU_NS=...), so both
// builds load into one process.
#ifndef SDVAE_EMU_NS
#define SDVAE_EMU_NS sdvae_cuda_emu
#endif
#define SDVAE_EMU_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

SDVAE_EMU_LIBRARY(SDVAE_EMU_NS, m) {
  m.def(
      "pad_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, int stride, "
      "int pad_left, int pad_top, int stages=0) -> str",
      &emulate);
  m.def("set_mutant(int m) -> ()", &set_mutant);
}
