// The CUDA side of csrc/api.h: what the CUDA kernels' host code needs of the
// device runtime (device guard, current stream, launch check, device
// properties), under one name for both builds of cuda/ops_cuda.cu:
//
// - the version-matched build (sam_fast._C): c10's CUDAGuard, ATen's current
//   stream, C10_CUDA_KERNEL_LAUNCH_CHECK, ATen's cached device properties;
// - the portable build (SAM_FAST_STABLE, sam_fast._C_stable_cuda): the stable
//   ABI's DeviceGuard, the current stream through the C shim
//   aoti_torch_get_current_cuda_stream (libtorch_cuda), the stable launch check
//   STD_CUDA_KERNEL_LAUNCH_CHECK (cudaGetLastError, formatted by
//   torch_c10_cuda_check_msg), cudaDeviceGetAttribute cached per device.
//
// Kept out of api.h: that header is also compiled by the host compiler alone,
// for the CPU kernels, without the CUDA runtime's headers.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "../api.h"

#ifdef SAM_FAST_STABLE
// USE_CUDA declares the CUDA shims (stream, check message); ops_cuda_stable.cu defines it
// before any header.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace sam_fast::cuda {

// Makes `device` current for the scope (and restores the previous one).
class DeviceGuard {
 public:
  explicit DeviceGuard(const Device& device)
#ifdef SAM_FAST_STABLE
      : guard_(static_cast<torch::stable::accelerator::DeviceIndex>(device.index())) {
  }
#else
      : guard_(device) {
  }
#endif

 private:
#ifdef SAM_FAST_STABLE
  torch::stable::accelerator::DeviceGuard guard_;
#else
  c10::cuda::CUDAGuard guard_;
#endif
};

// The current stream of `device` (the matched build: of the current device, which
// a DeviceGuard for `device` has made it).
inline cudaStream_t current_stream(int device) {
#ifdef SAM_FAST_STABLE
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
#else
  (void)device;
  return at::cuda::getCurrentCUDAStream();
#endif
}

// The compute capability's major number of `device`, asked once per device.
inline int device_major(int device) {
#ifdef SAM_FAST_STABLE
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices] = {};  // 0: not asked yet
  if (device >= 0 && device < kDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int major = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (device >= 0 && device < kDevices) cache[device].store(major, std::memory_order_relaxed);
  return major;
#else
  return at::cuda::getDeviceProperties(device)->major;
#endif
}

}  // namespace sam_fast::cuda

// After every kernel launch: a launch error (bad configuration, no kernel image for
// this GPU) as an exception.
#ifdef SAM_FAST_STABLE
#define SAM_FAST_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()
#else
#define SAM_FAST_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif
