// The tensor API the CPU kernels' host code is written against, in two builds
// of the same source (docs/extension.md, "Two libraries"):
//
// - the version-matched build (sam_fast._C): ATen's C++ API, which ties the
//   binary to the torch it was compiled with;
// - the portable build (SAM_FAST_STABLE, sam_fast._C_stable): PyTorch's stable
//   ABI (torch/csrc/stable, torch/headeronly) for TORCH_TARGET_VERSION 2.10,
//   whose one binary loads in every torch from 2.10 on.
//
// Only what the host code needs is here, under one name for both: element
// access, allocation, copies, a parallel loop, checks. Where the stable ABI
// has no counterpart (density and overlap of a layout, empty_strided) the
// answer is computed from sizes and strides, conservatively: a layout it
// cannot prove dense is staged through a temporary, which is always correct.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#ifdef SAM_FAST_STABLE
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>
#else
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#endif

namespace sam_fast {

#ifdef SAM_FAST_STABLE
using Tensor = torch::stable::Tensor;
// A view of a list argument inside the host code.
using TensorList = torch::headeronly::HeaderOnlyArrayRef<Tensor>;
// How an op's kernel receives a Tensor[] argument (what TORCH_BOX unboxes).
using ListArg = const std::vector<Tensor>&;
using OptTensorArg = const std::optional<Tensor>&;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;
template <typename T, unsigned N>
using SmallVec = std::vector<T>;
// As TORCH_CHECK: the message alone (STD_TORCH_CHECK's would start with the
// function, the file and the line of the build machine).
#define SAM_FAST_CHECK(cond, ...)                                          \
  do {                                                                     \
    if (!(cond)) throw std::runtime_error(::sam_fast::detail::message(__VA_ARGS__)); \
  } while (0)
namespace detail {
template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return out.str();
}
}  // namespace detail
#else
using Tensor = at::Tensor;
using TensorList = at::TensorList;
using ListArg = at::TensorList;
using OptTensorArg = const std::optional<at::Tensor>&;
using ScalarType = at::ScalarType;
using Device = at::Device;
using Half = at::Half;
using BFloat16 = at::BFloat16;
template <typename T, unsigned N>
using SmallVec = c10::SmallVector<T, N>;
#define SAM_FAST_CHECK TORCH_CHECK
#endif

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kUndefined = ScalarType::Undefined;

inline Device cpu_device() {
#ifdef SAM_FAST_STABLE
  return Device(torch::headeronly::DeviceType::CPU);
#else
  return Device(at::kCPU);
#endif
}

// For messages.
inline std::string device_str(const Device& d) {
#ifdef SAM_FAST_STABLE
  std::string s = d.is_cpu() ? "cpu" : d.is_cuda() ? "cuda" : "device";
  if (d.has_index()) s += ":" + std::to_string(static_cast<int>(d.index()));
  return s;
#else
  return d.str();
#endif
}

inline std::string shape_str(const Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

inline size_t element_size(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Double:
      return 8;
    case ScalarType::Float:
      return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
      return 2;
    default:
      SAM_FAST_CHECK(false, "sam_fast: unexpected dtype ", dtype);
  }
  return 0;
}

// Non-overlapping and dense: the elements fill one block of memory, each once.
inline bool is_dense(const Tensor& t) {
#ifdef SAM_FAST_STABLE
  if (t.is_contiguous()) return true;
  // Some order of the dimensions (by stride, size-1 ones ignored) is contiguous.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return true;
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
#else
  return t.is_non_overlapping_and_dense();
#endif
}

// Some elements certainly share memory (a dimension of size > 1 with stride 0,
// as an expanded view has), so the tensor cannot be written in place.
inline bool has_internal_overlap(const Tensor& t) {
#ifdef SAM_FAST_STABLE
  if (t.is_contiguous()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  }
  return false;
#else
  return at::has_internal_overlap(t) == at::MemOverlap::Yes;
#endif
}

// A new tensor of `ref`'s shape and device in `dtype`, laid out as `ref` when
// `ref` is dense (so element k of its memory is element k of ref's), else
// contiguous.
inline Tensor staging_like(const Tensor& ref, ScalarType dtype, bool ref_dense) {
#ifdef SAM_FAST_STABLE
  if (ref_dense) {
    // No empty_strided in the stable ABI: a converting copy keeps a dense layout.
    return torch::stable::to(ref, dtype, std::nullopt, std::nullopt, std::nullopt,
                             /*non_blocking=*/false, /*copy=*/true);
  }
  std::vector<int64_t> sizes;
  for (int64_t d = 0; d < ref.dim(); ++d) sizes.push_back(ref.size(d));
  return torch::stable::empty(sizes, dtype, std::nullopt, ref.device());
#else
  const auto options = ref.options().dtype(dtype);
  return ref_dense ? at::empty_strided(ref.sizes(), ref.strides(), options)
                   : at::empty(ref.sizes(), options);
#endif
}

inline void copy_into(Tensor& dst, const Tensor& src) {
#ifdef SAM_FAST_STABLE
  torch::stable::copy_(dst, src);
#else
  dst.copy_(src);
#endif
}

// `t` on `device` in `dtype`: `t` itself when it already is.
inline Tensor to_device(const Tensor& t, const Device& device, ScalarType dtype) {
#ifdef SAM_FAST_STABLE
  if (t.device() == device && t.scalar_type() == dtype) return t;
  return torch::stable::to(t, dtype, std::nullopt, device);
#else
  return t.to(device, dtype);
#endif
}

// The one element of a one-element tensor, read on the host in `T` (float or
// double), as Tensor::item would convert it.
template <typename T>
T item(const Tensor& t) {
  const ScalarType want = sizeof(T) == 8 ? kDouble : kFloat;
  const Tensor host = to_device(t, cpu_device(), want);
  return *host.const_data_ptr<T>();
}

// A new 1-d CPU or `device` tensor of `n` elements.
inline Tensor empty_1d(int64_t n, ScalarType dtype, const Device& device) {
#ifdef SAM_FAST_STABLE
  std::vector<int64_t> sizes{n};
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
#else
  return at::empty({n}, at::TensorOptions().dtype(dtype).device(device));
#endif
}

// A new 0-dim tensor on `device`, uninitialised or holding `value`.
inline Tensor empty_scalar(ScalarType dtype, const Device& device) {
#ifdef SAM_FAST_STABLE
  std::vector<int64_t> sizes;
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
#else
  return at::empty({}, at::TensorOptions().dtype(dtype).device(device));
#endif
}

inline Tensor full_scalar(double value, ScalarType dtype, const Device& device) {
#ifdef SAM_FAST_STABLE
  std::vector<int64_t> sizes;
  return torch::stable::full(sizes, value, dtype, std::nullopt, device);
#else
  return at::full({}, value, at::TensorOptions().dtype(dtype).device(device));
#endif
}

// In place sqrt with ATen's own kernel (the specification's roots, bit for bit:
// ATen's CPU sqrt is not always correctly rounded).
inline void sqrt_inplace(Tensor& t) {
#ifdef SAM_FAST_STABLE
  std::array<StableIValue, 1> stack{torch::stable::detail::from(t)};
  TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::sqrt_", "", stack.data(), TORCH_ABI_VERSION));
  // The returned alias is a new handle: owning it here releases it.
  (void)torch::stable::detail::to<Tensor>(stack[0]);
#else
  t.sqrt_();
#endif
}

// A new tensor holding ATen's sqrt of `t` (out of place).
inline Tensor sqrt_of(const Tensor& t) {
#ifdef SAM_FAST_STABLE
  std::array<StableIValue, 1> stack{torch::stable::detail::from(t)};
  TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::sqrt", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
#else
  return at::sqrt(t);
#endif
}

inline Tensor contiguous_of(const Tensor& t) {
#ifdef SAM_FAST_STABLE
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
#else
  return t.contiguous();
#endif
}

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#ifdef SAM_FAST_STABLE
  torch::stable::parallel_for(begin, end, grain, f);
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

}  // namespace sam_fast

// Every op's kernel for one dispatch key, registered alike by each library that has
// kernels (ops_cpu.cpp, ops_cuda.cu; either build): TORCH_BOX adapts a kernel to the
// stable ABI's boxed calling convention. Used as
// SAM_FAST_LIBRARY_IMPL(CPU, m) { SAM_FAST_IMPL_EVERY_OP(m); } in the namespace of the
// kernels (the matched build needs <torch/library.h> included there).
#ifdef SAM_FAST_STABLE
#define SAM_FAST_KERNEL(fn) TORCH_BOX(&fn)
#define SAM_FAST_LIBRARY_IMPL(key, m) STABLE_TORCH_LIBRARY_IMPL(sam_fast, key, m)
#else
#define SAM_FAST_KERNEL(fn) &fn
#define SAM_FAST_LIBRARY_IMPL(key, m) TORCH_LIBRARY_IMPL(sam_fast, key, m)
#endif
#define SAM_FAST_IMPL_EVERY_OP(m) \
  m.impl("grad_sumsq", SAM_FAST_KERNEL(grad_sumsq)); \
  m.impl("perturb_", SAM_FAST_KERNEL(perturb_)); \
  m.impl("restore_", SAM_FAST_KERNEL(restore_)); \
  m.impl("restore_sgd_", SAM_FAST_KERNEL(restore_sgd_)); \
  m.impl("restore_adamw_", SAM_FAST_KERNEL(restore_adamw_)); \
  m.impl("sampa_points_", SAM_FAST_KERNEL(sampa_points_)); \
  m.impl("sampa_update_", SAM_FAST_KERNEL(sampa_update_)); \
  m.impl("dot_sumsq", SAM_FAST_KERNEL(dot_sumsq)); \
  m.impl("combine_", SAM_FAST_KERNEL(combine_)); \
  m.impl("ema_residual_", SAM_FAST_KERNEL(ema_residual_)); \
  m.impl("bsam_noise_", SAM_FAST_KERNEL(bsam_noise_)); \
  m.impl("bsam_ascent_", SAM_FAST_KERNEL(bsam_ascent_)); \
  m.impl("bsam_update_", SAM_FAST_KERNEL(bsam_update_))
