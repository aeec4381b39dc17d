// CUDA launches of sdvae::pad_conv2d; the kernels and their design notes are in
// pad_conv2d_kernels.cuh. Launches use the current stream and are checked.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

#include "pad_conv2d_kernels.cuh"

namespace sdvae {

using pad_conv2d_detail::Launch;
using pad_conv2d_detail::Path;

namespace {

// The device's compute capability (major), asked once per device.
int compute_capability_major(int device) {
  static std::atomic<int> known[64];  // 0: not asked yet
  if (device >= 0 && device < 64 && known[device].load() != 0) return known[device].load();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (device >= 0 && device < 64) known[device].store(major);
  return major;
}

template <typename T, bool VEC, int STAGES>
void launch_tc_kernel(const T* xp, const T* wp, const float* bias, T* op, const Launch& l,
                      int device, cudaStream_t stream) {
  const auto kernel = pad_conv2d_detail::pad_conv2d_tc_kernel<T, VEC, STAGES>;
  // More than 48 KiB of dynamic shared memory needs an opt-in, once per kernel and device
  // (this static belongs to this instantiation alone: its byte count depends on STAGES only).
  static std::atomic<bool> allowed[64];
  const bool known = device >= 0 && device < 64;
  if (!known || !allowed[device].load()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        l.smem_bytes));
    if (known) allowed[device].store(true);
  }
  kernel<<<l.grid, l.threads, l.smem_bytes, stream>>>(xp, wp, bias, op, l.p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool VEC>
void launch_tc_stages(const T* xp, const T* wp, const float* bias, T* op, const Launch& l,
                      int device, cudaStream_t stream) {
  switch (l.stages) {
    case 2:
      launch_tc_kernel<T, VEC, 2>(xp, wp, bias, op, l, device, stream);
      break;
    case 3:
      launch_tc_kernel<T, VEC, 3>(xp, wp, bias, op, l, device, stream);
      break;
    default:
      launch_tc_kernel<T, VEC, 4>(xp, wp, bias, op, l, device, stream);
      break;
  }
}

template <typename T>
void launch_tc(const at::Tensor& x, const Launch& l, const float* bias, at::Tensor& out,
               cudaStream_t stream) {
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  const T* wp = reinterpret_cast<const T*>(l.wk.const_data_ptr());
  T* op = reinterpret_cast<T*>(out.mutable_data_ptr());
  const int device = x.device().index();
  if (l.path == Path::kTensorCoreVec) {
    launch_tc_stages<T, true>(xp, wp, bias, op, l, device, stream);
  } else {
    launch_tc_stages<T, false>(xp, wp, bias, op, l, device, stream);
  }
}

}  // namespace

// Called from csrc/pad_conv2d.cpp after the argument checks; `x` is NCHW- or NHWC-contiguous
// and `out` is allocated in the same memory format.
void pad_conv2d_cuda_launch(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::Tensor& out,
                            int64_t stride, int64_t pad_left, int64_t pad_top) {
  const c10::cuda::CUDAGuard guard(x.device());
  // c10's current stream is what at::cuda::getCurrentCUDAStream returns; this header avoids
  // ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers at build time.
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  if (x.scalar_type() != at::kFloat) {
    const int cc_major = compute_capability_major(x.device().index());
    TORCH_CHECK(cc_major >= 8, "pad_conv2d: the fp16/bf16 CUDA kernel needs compute capability "
                "8.0 or newer, this GPU is sm_", cc_major, "x");
  }
  const Launch l = pad_conv2d_detail::prepare_launch(x, weight, bias, out, stride, pad_left,
                                                     pad_top);
  const float* bp = l.b32.defined() ? l.b32.const_data_ptr<float>() : nullptr;
  switch (l.path) {
    case Path::kF32Direct:
      if (l.out_cl) {
        pad_conv2d_detail::pad_conv2d_f32_kernel<true><<<l.grid, l.threads, 0, stream>>>(
            x.const_data_ptr<float>(), l.wk.const_data_ptr<float>(), bp,
            out.mutable_data_ptr<float>(), l.p);
      } else {
        pad_conv2d_detail::pad_conv2d_f32_kernel<false><<<l.grid, l.threads, 0, stream>>>(
            x.const_data_ptr<float>(), l.wk.const_data_ptr<float>(), bp,
            out.mutable_data_ptr<float>(), l.p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    case Path::kTensorCoreVec:
    case Path::kTensorCoreScalar:
      if (x.scalar_type() == at::kHalf) {
        launch_tc<__half>(x, l, bp, out, stream);
      } else {
        launch_tc<__nv_bfloat16>(x, l, bp, out, stream);
      }
      break;
  }
}

}  // namespace sdvae
