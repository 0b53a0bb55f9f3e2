// CUDA implementations of the sam_fast ops (the "cuda" backend).
//
// One translation unit on purpose: nvcc's cost is dominated by PyTorch's
// headers, so every kernel lives here. Each op is one multi-tensor-apply
// launch (multi_tensor_apply.cuh) over all tensors of a group; the norm adds
// one tiny cleanup launch. Everything runs on the current stream and reads
// device scalars (sumsq, grad_scale, found_inf, step counters) in the kernels,
// so no op synchronizes with the host and a whole step can be captured in a
// CUDA graph. Storage is fp32, fp16 or bf16; math is fp32 (elementwise.h).
// Two builds of this one source (csrc/api.h, cuda_api.h): sam_fast._C on ATen, and
// with SAM_FAST_STABLE (cuda/ops_cuda_stable.cu) sam_fast._C_stable_cuda on PyTorch's
// stable ABI.
#ifndef SAM_FAST_STABLE
#include <ATen/ATen.h>
#include <torch/library.h>
#endif

#include <cstdint>
#include <vector>

#include "../elementwise.h"
#include "../bsam.h"
#include "../family.h"
#include "../op_args.h"
#include "cuda_api.h"
#include "multi_tensor_apply.cuh"

namespace sam_fast::cuda {
namespace {

// ---------------------------------------------------------------------------
// The elementwise kernel: per block one chunk of one tensor; 16-byte vector
// loads and stores where every pointer of the chunk is 16-byte aligned, a
// scalar loop for the rest (the tail, or misaligned views).

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ float ld(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T st(float v) {
  return static_cast<T>(v);
}

__device__ __forceinline__ bool bit(unsigned mask, int k) { return (mask >> k) & 1u; }

// Op: a functor with
//   Ctx prepare(const Extra&) const   -- per-block constants (device scalars read once)
//   unsigned reads(const Ctx&) const, writes(const Ctx&) const  -- list bitmasks
//   void apply(T (&e)[Depth], const Ctx&) const  -- one element of every list
// Inlined into the kernels below: meta stays in the parameter space (taking
// its address in a real call would copy it to local memory).
template <typename T, int Depth, typename Extra, bool kLarge, typename Op>
__device__ __forceinline__ void elementwise_body(const TensorListMetadata<Depth, Extra, kLarge>& meta,
                                                 const Op& op) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = meta.numel[t] - start;
  const int64_t n = remaining < kChunkSize ? remaining : kChunkSize;
  const auto ctx = op.prepare(meta.extra[std::is_empty_v<Extra> ? 0 : t]);
  const unsigned reads = op.reads(ctx);
  const unsigned writes = op.writes(ctx);

  T* p[Depth];
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < Depth; ++k) {
    void* base = meta.addresses[k][t];
    p[k] = base == nullptr ? nullptr : static_cast<T*>(base) + start;
    aligned = aligned && (reinterpret_cast<uintptr_t>(p[k]) % 16 == 0);
  }

  int64_t done = 0;
  if (aligned) {
    using V = Vec16<T>;
    const int64_t nvec = n / V::kSize;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      V r[Depth];
#pragma unroll
      for (int k = 0; k < Depth; ++k) {
        if (bit(reads, k)) r[k] = reinterpret_cast<const V*>(p[k])[i];
      }
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        T e[Depth];
#pragma unroll
        for (int k = 0; k < Depth; ++k) e[k] = r[k].v[j];
        op.apply(e, ctx);
#pragma unroll
        for (int k = 0; k < Depth; ++k) r[k].v[j] = e[k];
      }
#pragma unroll
      for (int k = 0; k < Depth; ++k) {
        if (bit(writes, k)) reinterpret_cast<V*>(p[k])[i] = r[k];
      }
    }
    done = nvec * V::kSize;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    T e[Depth];
#pragma unroll
    for (int k = 0; k < Depth; ++k) {
      if (bit(reads, k)) e[k] = p[k][i];
    }
    op.apply(e, ctx);
#pragma unroll
    for (int k = 0; k < Depth; ++k) {
      if (bit(writes, k)) p[k][i] = e[k];
    }
  }
}

// One kernel per metadata size, overloaded on the metadata's type; the 32 KiB
// one is only declared in device passes for pre-Volta architectures
// (multi_tensor_apply.cuh), where the host never launches it.
template <typename T, int Depth, typename Extra, typename Op>
__global__ void __launch_bounds__(kBlockSize)
    elementwise_kernel(const TensorListMetadata<Depth, Extra, false> meta, const Op op) {
  elementwise_body<T>(meta, op);
}

#if SAMF_LARGE_PARAMS
template <typename T, int Depth, typename Extra, typename Op>
__global__ void __launch_bounds__(kBlockSize)
    elementwise_kernel(const TensorListMetadata<Depth, Extra, true> meta, const Op op)
#if SAMF_LARGE_KERNEL_DEFINED
{
  elementwise_body<T>(meta, op);
}
#else
    ;
#endif
#endif

// The data pointers of a FlatLists' first Depth lists (null for an absent list).
template <int Depth>
ListPointers<Depth> list_pointers(const FlatLists& lists) {
  ListPointers<Depth> ptrs;
  for (int k = 0; k < Depth; ++k) {
    ptrs.list[k] = lists.ptrs(k).empty() ? nullptr : lists.ptrs(k).data();
  }
  return ptrs;
}

template <int Depth, typename T, typename Extra, typename Op>
void launch_elementwise(const FlatLists& lists, const Extra* extras, const Op& op) {
  static_assert(sizeof(Op) <= kOpParamBytes, "op functor too large for the kernel parameters");
  const cudaStream_t stream = current_stream(lists.device().index());
  multi_tensor_apply<Depth, Extra>(
      lists.device().index(), list_pointers<Depth>(lists), lists.numels().data(), lists.size(),
      extras, [&](const auto& meta, int blocks, int64_t) {
        elementwise_kernel<T><<<blocks, kBlockSize, 0, stream>>>(meta, op);
        SAM_FAST_CUDA_LAUNCH_CHECK();
      });
}

const float* scalar_ptr(OptTensorArg s) {
  return s.has_value() ? s->mutable_data_ptr<float>() : nullptr;
}

struct NoCtx {};

// ---------------------------------------------------------------------------
// grad_sumsq: per-block partials of a fixed reduction tree, then one block sums
// the partials in a fixed order (no atomics): same inputs, same bits. A NaN
// or inf anywhere propagates through the sums, so the result itself is the
// non-finite flag that SAM reads (a non-finite norm skips the perturbation).

template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[kBlockSize / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlockSize / 32 ? warp_sums[lane] : Acc(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

struct SumsqArgs {
  float* partials;  // one per block of the whole call
  int64_t first_block;
  bool weighted;    // ASAM: ((|w| + eta) * g)^2
  bool has_eta;
  float eta;
};

template <typename T>
__device__ __forceinline__ float sumsq_term(T g, T w, const SumsqArgs& a) {
  float v = ld(g);
  if (a.weighted) {
    float t = fabsf(ld(w));
    if (a.has_eta) t = t + a.eta;
    v = t * v;
  }
  return v * v;
}

template <typename T, bool kLarge>
__device__ __forceinline__ void sumsq_body(const TensorListMetadata<2, NoExtra, kLarge>& meta,
                                           const SumsqArgs& a) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = meta.numel[t] - start;
  const int64_t n = remaining < kChunkSize ? remaining : kChunkSize;
  const T* g = static_cast<const T*>(meta.addresses[0][t]) + start;
  const T* w = a.weighted ? static_cast<const T*>(meta.addresses[1][t]) + start : g;
  const bool aligned =
      reinterpret_cast<uintptr_t>(g) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  float acc = 0.0f;
  int64_t done = 0;
  if (aligned) {
    using V = Vec16<T>;
    const int64_t nvec = n / V::kSize;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const V gv = reinterpret_cast<const V*>(g)[i];
      V wv = gv;
      if (a.weighted) wv = reinterpret_cast<const V*>(w)[i];
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) acc += sumsq_term(gv.v[j], wv.v[j], a);
    }
    done = nvec * V::kSize;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) acc += sumsq_term(g[i], w[i], a);
  acc = block_sum(acc);
  if (threadIdx.x == 0) a.partials[a.first_block + blockIdx.x] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kBlockSize)
    sumsq_kernel(const TensorListMetadata<2, NoExtra, false> meta, const SumsqArgs a) {
  sumsq_body<T>(meta, a);
}

#if SAMF_LARGE_PARAMS
template <typename T>
__global__ void __launch_bounds__(kBlockSize)
    sumsq_kernel(const TensorListMetadata<2, NoExtra, true> meta, const SumsqArgs a)
#if SAMF_LARGE_KERNEL_DEFINED
{
  sumsq_body<T>(meta, a);
}
#else
    ;
#endif
#endif

__global__ void __launch_bounds__(kBlockSize)
    sum_partials_kernel(const float* partials, int64_t n, float* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(acc);
}

Tensor grad_sumsq(ListArg grads, ListArg params, double eta) {
  SAM_FAST_CHECK(grads.size() > 0, "grad_sumsq needs at least one tensor");
  const bool weighted = !params.empty();
  FlatLists lists({{"grads", grads, true, false}, {"params", params, true, false}},
                  "grad_sumsq");
  check_storage_dtype(grads[0].scalar_type(), "grad_sumsq");
  const Device device = grads[0].device();
  const DeviceGuard guard(device);
  Tensor out = empty_scalar(kFloat, device);
  int64_t blocks = 0;
  for (size_t j = 0; j < lists.size(); ++j) blocks += (lists.numel(j) + kChunkSize - 1) / kChunkSize;
  Tensor partials = empty_1d(blocks > 0 ? blocks : 1, kFloat, device);
  const cudaStream_t stream = current_stream(device.index());
  if (blocks > 0) {
    SumsqArgs a{partials.mutable_data_ptr<float>(), 0, weighted, eta != 0.0,
                static_cast<float>(eta)};
    dispatch_storage(lists.dtype(), "grad_sumsq", [&](auto tag) {
      using T = decltype(tag);
      multi_tensor_apply<2, NoExtra>(
          lists.device().index(), list_pointers<2>(lists), lists.numels().data(), lists.size(),
          static_cast<const NoExtra*>(nullptr), [&](const auto& meta, int nb, int64_t first) {
            SumsqArgs args = a;
            args.first_block = first;
            sumsq_kernel<T><<<nb, kBlockSize, 0, stream>>>(meta, args);
            SAM_FAST_CUDA_LAUNCH_CHECK();
          });
    });
  }
  sum_partials_kernel<<<1, kBlockSize, 0, stream>>>(partials.mutable_data_ptr<float>(), blocks,
                                                   out.mutable_data_ptr<float>());
  SAM_FAST_CUDA_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------
// perturb_: lists w (read, written), g, backup (written).

// The scale is derived in every thread from the device scalars (a handful of
// flops after two loads), so no host-launched op chain computes it first.
struct ScaleArgs {
  const void* sumsq;       // float, or double with is_double
  const void* grad_scale;  // same dtype as sumsq; null without GradScaler
  double rho;
  double eps;
  bool normalize;
  bool is_double;

  __device__ float scale() const {
    if (is_double) {
      return static_cast<float>(perturbation_scale<double>(
          *static_cast<const double*>(sumsq), rho, eps, normalize,
          static_cast<const double*>(grad_scale)));
    }
    return perturbation_scale<float>(*static_cast<const float*>(sumsq), static_cast<float>(rho),
                                     static_cast<float>(eps), normalize,
                                     static_cast<const float*>(grad_scale));
  }
};

// Keeps the device copies of sumsq / grad_scale alive for the launch.
struct DeviceScale {
  ScaleInputs in;
  ScaleArgs args;
};

DeviceScale device_scale(const Tensor& sumsq, OptTensorArg grad_scale,
                         Device device, double rho, double eps, bool normalize) {
  DeviceScale d{scale_inputs(sumsq, grad_scale, device), {}};
  d.args = {d.in.sumsq.mutable_data_ptr(),
            d.in.grad_scale ? d.in.grad_scale->mutable_data_ptr() : nullptr, rho, eps, normalize,
            d.in.is_double};
  return d;
}

struct PerturbOp {
  ScaleArgs scale;
  bool adaptive;
  bool has_eta;
  float eta;

  __device__ float prepare(NoExtra) const { return scale.scale(); }
  __device__ unsigned reads(float) const { return 0b011u; }
  __device__ unsigned writes(float) const { return 0b101u; }
  template <typename T>
  __device__ void apply(T (&e)[3], float s) const {
    const float x = ld(e[0]);
    e[2] = e[0];
    e[0] = st<T>(perturbed(x, ld(e[1]), s, adaptive, has_eta, eta));
  }
};

void perturb_(ListArg params, ListArg grads, ListArg backups,
              const Tensor& sumsq, double rho, double eps, bool normalize,
              std::optional<double> eta, OptTensorArg grad_scale) {
  FlatLists lists({{"params", params, true, true},
                   {"grads", grads, true, false},
                   {"backups", backups, false, true}},
                  "perturb_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const DeviceScale s = device_scale(sumsq, grad_scale, lists.device(), rho, eps, normalize);
  const bool adaptive = eta.has_value();
  const PerturbOp op{s.args, adaptive, adaptive && *eta != 0.0,
                     static_cast<float>(eta.value_or(0.0))};
  dispatch_storage(lists.dtype(), "perturb_", [&](auto tag) {
    launch_elementwise<3, decltype(tag), NoExtra>(lists, nullptr, op);
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// restore_: lists w (written), backup: a copy of the stored bits.

struct CopyOp {
  __device__ NoCtx prepare(NoExtra) const { return {}; }
  __device__ unsigned reads(NoCtx) const { return 0b10u; }
  __device__ unsigned writes(NoCtx) const { return 0b01u; }
  template <typename T>
  __device__ void apply(T (&e)[2], NoCtx) const {
    e[0] = e[1];
  }
};

void restore_(ListArg params, ListArg backups) {
  FlatLists lists({{"params", params, false, true}, {"backups", backups, true, false}},
                  "restore_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  dispatch_storage(lists.dtype(), "restore_", [&](auto tag) {
    launch_elementwise<2, decltype(tag), NoExtra>(lists, nullptr, CopyOp{});
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// restore_sgd_: lists w (written), backup, g, momentum buffer.

struct StepCtx {
  bool skip;  // found_inf: restore only
  float inv_scale;
};

__device__ __forceinline__ StepCtx step_ctx(const float* grad_scale, const float* found_inf) {
  StepCtx c;
  c.skip = found_inf != nullptr && *found_inf != 0.0f;
  c.inv_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  return c;
}

struct SgdOp {
  SgdCoeffs c;
  const float* grad_scale;  // may be null
  const float* found_inf;   // may be null

  __device__ StepCtx prepare(NoExtra) const { return step_ctx(grad_scale, found_inf); }
  __device__ unsigned reads(const StepCtx&) const {
    return 0b0110u | (c.has_momentum && !c.init_buffers ? 0b1000u : 0u);
  }
  __device__ unsigned writes(const StepCtx& ctx) const {
    return ctx.skip ? 0b0001u : (0b0001u | (c.has_momentum ? 0b1000u : 0u));
  }
  template <typename T>
  __device__ void apply(T (&e)[4], const StepCtx& ctx) const {
    if (ctx.skip) {
      e[0] = e[1];
      return;
    }
    const float x = ld(e[1]);
    float g = ld(e[2]);
    if (grad_scale != nullptr) g = g * ctx.inv_scale;
    float new_buf = 0.0f;
    const bool read_buf = c.has_momentum && !c.init_buffers;
    const float d = sgd_direction(c, x, g, read_buf ? ld(e[3]) : 0.0f, &new_buf);
    if (c.has_momentum) e[3] = st<T>(new_buf);
    e[0] = st<T>(x + c.neg_lr * d);
  }
};

std::optional<Tensor> optional_scalar_on(OptTensorArg s,
                                             Device device, const char* what) {
  if (!s.has_value()) return std::nullopt;
  return scalar_on(*s, device, what);
}

void restore_sgd_(ListArg params, ListArg backups, ListArg grads,
                  ListArg momentum_buffers, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool init_buffers,
                  OptTensorArg grad_scale,
                  OptTensorArg found_inf) {
  const bool has_momentum = momentum != 0.0;
  SAM_FAST_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
                 "restore_sgd_: momentum != 0 needs momentum_buffers");
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"momentum_buffers", has_momentum ? TensorList(momentum_buffers) : TensorList(),
                    !init_buffers, true}},
                  "restore_sgd_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const auto gs = optional_scalar_on(grad_scale, lists.device(), "grad_scale");
  const auto fi = optional_scalar_on(found_inf, lists.device(), "found_inf");
  const SgdOp op{make_sgd_coeffs(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                 init_buffers),
                 scalar_ptr(gs), scalar_ptr(fi)};
  dispatch_storage(lists.dtype(), "restore_sgd_", [&](auto tag) {
    launch_elementwise<4, decltype(tag), NoExtra>(lists, nullptr, op);
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// restore_adamw_: lists w (written), backup, g, exp_avg, exp_avg_sq, max_exp_avg_sq.

struct AdamExtra {
  const void* step;        // device step counter (null with host counters)
  AdamStepScalars host;    // bias corrections computed on the host
};

struct AdamCtx {
  StepCtx step;
  AdamStepScalars s;
};

struct AdamOp {
  AdamCoeffs c;
  const float* grad_scale;
  const float* found_inf;
  bool host_counters;
  bool step_is_double;

  __device__ AdamCtx prepare(const AdamExtra& extra) const {
    AdamCtx ctx;
    ctx.step = step_ctx(grad_scale, found_inf);
    if (host_counters) {
      ctx.s = extra.host;
    } else {
      // The counters were bumped by the launch before this one; torch_ops
      // converts them to the math dtype (fp32) before taking powers.
      const float step = step_is_double ? static_cast<float>(*static_cast<const double*>(extra.step))
                                        : *static_cast<const float*>(extra.step);
      ctx.s = adam_device_step_scalars(c, step);
    }
    return ctx;
  }
  __device__ unsigned reads(const AdamCtx&) const {
    return 0b011110u | (c.amsgrad ? 0b100000u : 0u);
  }
  __device__ unsigned writes(const AdamCtx& ctx) const {
    return ctx.step.skip ? 0b000001u : (0b011001u | (c.amsgrad ? 0b100000u : 0u));
  }
  template <typename T>
  __device__ void apply(T (&e)[6], const AdamCtx& ctx) const {
    if (ctx.step.skip) {
      e[0] = e[1];
      return;
    }
    float g = ld(e[2]);
    if (grad_scale != nullptr) g = g * ctx.step.inv_scale;
    float m = ld(e[3]);
    float v = ld(e[4]);
    float vmax = c.amsgrad ? ld(e[5]) : 0.0f;
    const float x =
        c.amsgrad ? adam_update<true>(c, ctx.s, host_counters, ld(e[1]), g, &m, &v, &vmax)
                  : adam_update<false>(c, ctx.s, host_counters, ld(e[1]), g, &m, &v, &vmax);
    e[3] = st<T>(m);
    e[4] = st<T>(v);
    if (c.amsgrad) e[5] = st<T>(vmax);
    e[0] = st<T>(x);
  }
};

#ifdef SAM_FAST_STABLE
// Device step counters, +1 each unless found_inf is set (torch_ops' and the matched
// build's _foreach_add_(steps, found_inf == 0), which the stable ABI cannot call with
// a Scalar): one thread per counter, the counters' addresses by value as the
// multi-tensor metadata travels.
struct StepCounters {
  static constexpr int kMax = 480;  // 3840 bytes of addresses: within 4 KiB of parameters
  void* ptr[kMax];
};

__global__ void __launch_bounds__(kBlockSize)
    bump_steps_kernel(const StepCounters counters, int n, bool is_double,
                      const float* found_inf) {
  const int i = static_cast<int>(blockIdx.x) * kBlockSize + static_cast<int>(threadIdx.x);
  if (i >= n || (found_inf != nullptr && *found_inf != 0.0f)) return;
  if (is_double) {
    double* p = static_cast<double*>(counters.ptr[i]);
    *p = *p + 1.0;
  } else {
    float* p = static_cast<float*>(counters.ptr[i]);
    *p = *p + 1.0f;
  }
}

void bump_device_steps(ListArg steps, bool is_double, const float* found_inf,
                       const Device& device) {
  const cudaStream_t stream = current_stream(device.index());
  StepCounters counters;
  for (size_t begin = 0; begin < steps.size(); begin += StepCounters::kMax) {
    const int n = static_cast<int>(
        std::min<size_t>(StepCounters::kMax, steps.size() - begin));
    for (int i = 0; i < n; ++i) counters.ptr[i] = steps[begin + i].mutable_data_ptr();
    bump_steps_kernel<<<(n + kBlockSize - 1) / kBlockSize, kBlockSize, 0, stream>>>(
        counters, n, is_double, found_inf);
    SAM_FAST_CUDA_LAUNCH_CHECK();
  }
}
#endif

void restore_adamw_(ListArg params, ListArg backups, ListArg grads,
                    ListArg exp_avgs, ListArg exp_avg_sqs,
                    ListArg max_exp_avg_sqs, ListArg state_steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                    bool maximize, bool decoupled_weight_decay,
                    OptTensorArg grad_scale,
                    OptTensorArg found_inf) {
  SAM_FAST_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(),
                 "restore_adamw_: amsgrad=True needs max_exp_avg_sqs");
  SAM_FAST_CHECK(state_steps.size() == params.size(), "restore_adamw_: state_steps has ",
                 state_steps.size(), " tensors but params has ", params.size());
  SAM_FAST_CHECK(params.size() > 0, "restore_adamw_: params is empty");
  const Device device = params[0].device();
  const DeviceGuard guard(device);
  const bool host = steps_on_host(state_steps, device);
  std::optional<Tensor> fi = optional_scalar_on(found_inf, device, "found_inf");
  if (host && fi.has_value()) {
    // Host counters cannot be bumped conditionally without reading the flag:
    // the one host sync, as in torch_ops and GradScaler's default path.
    // Adam(capturable=True) keeps the counters on the device and avoids it.
    if (item<float>(*fi) != 0.0f) {
      restore_(params, backups);
      return;
    }
    fi.reset();
  }
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"exp_avgs", exp_avgs, true, true},
                   {"exp_avg_sqs", exp_avg_sqs, true, true},
                   {"max_exp_avg_sqs", amsgrad ? TensorList(max_exp_avg_sqs) : TensorList(), true, true}},
                  "restore_adamw_");
  if (!lists.empty()) check_storage_dtype(lists.dtype(), "restore_adamw_");

  std::vector<AdamExtra> extras(lists.size());
  bool step_is_double = false;
  if (host) {
    const auto scalars = bump_host_steps(state_steps, lists, lr, beta1, beta2);
    for (size_t j = 0; j < lists.size(); ++j) extras[j] = {nullptr, scalars[j]};
  } else {
    const ScalarType step_dtype = state_steps[0].scalar_type();
    SAM_FAST_CHECK(step_dtype == kFloat || step_dtype == kDouble,
                   "restore_adamw_: Adam's step counters are float32 or float64, got ", step_dtype);
    for (size_t i = 0; i < state_steps.size(); ++i) {
      SAM_FAST_CHECK(state_steps[i].scalar_type() == step_dtype && state_steps[i].numel() == 1,
                     "restore_adamw_: state_steps[", i, "] must be a one-element ", step_dtype,
                     " tensor like state_steps[0]");
    }
    step_is_double = step_dtype == kDouble;
    // Bump first (a separate launch, so every block of the update reads the
    // new count); where found_inf is set the counters stay.
#ifdef SAM_FAST_STABLE
    bump_device_steps(state_steps, step_is_double, scalar_ptr(fi), device);
#else
    if (fi.has_value()) {
      at::_foreach_add_(state_steps, fi->eq(0).to(step_dtype));
    } else {
      at::_foreach_add_(state_steps, 1);
    }
#endif
    for (size_t j = 0; j < lists.size(); ++j) {
      extras[j] = {state_steps[lists.index(j)].mutable_data_ptr(), {}};
    }
  }
  if (lists.empty()) return;
  const auto gs = optional_scalar_on(grad_scale, device, "grad_scale");
  const AdamOp op{make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                   decoupled_weight_decay),
                  scalar_ptr(gs), scalar_ptr(fi), host, step_is_double};
  dispatch_storage(lists.dtype(), "restore_adamw_", [&](auto tag) {
    launch_elementwise<6, decltype(tag), AdamExtra>(lists, extras.data(), op);
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// sampa_points_: lists x (read, written), g_y, momentum buffer (read), backup, y.

struct SampaPointsOp {
  SgdCoeffs c;
  ScaleArgs scale;

  __device__ float prepare(NoExtra) const { return scale.scale(); }
  __device__ unsigned reads(float) const {
    return 0b00011u | (c.has_momentum && !c.init_buffers ? 0b00100u : 0u);
  }
  __device__ unsigned writes(float) const { return 0b11001u; }
  template <typename T>
  __device__ void apply(T (&e)[5], float s) const {
    const float x = ld(e[0]);
    const float g = ld(e[1]);
    float unused = 0.0f;
    const bool read_buf = c.has_momentum && !c.init_buffers;
    const float d = sgd_direction(c, x, g, read_buf ? ld(e[2]) : 0.0f, &unused);
    e[4] = st<T>(x + c.neg_lr * d);
    e[3] = e[0];
    e[0] = st<T>(perturbed(x, g, s, false, false, 0.0f));
  }
};

void sampa_points_(ListArg params, ListArg grads_y, ListArg momentum_buffers,
                   ListArg backups, ListArg ys, const Tensor& sumsq, double rho,
                   double eps, double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool init_buffers) {
  const bool reads_buffers = momentum != 0.0 && !init_buffers;
  SAM_FAST_CHECK(!reads_buffers || momentum_buffers.size() == params.size(),
                 "sampa_points_: momentum != 0 needs momentum_buffers");
  FlatLists lists({{"params", params, true, true},
                   {"grads_y", grads_y, true, false},
                   {"momentum_buffers", reads_buffers ? TensorList(momentum_buffers) : TensorList(), true,
                    false},
                   {"backups", backups, false, true},
                   {"ys", ys, false, true}},
                  "sampa_points_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const DeviceScale s =
      device_scale(sumsq, std::nullopt, lists.device(), rho, eps, /*normalize=*/true);
  const SampaPointsOp op{make_sgd_coeffs(lr, momentum, dampening, weight_decay, nesterov,
                                         maximize, init_buffers),
                         s.args};
  dispatch_storage(lists.dtype(), "sampa_points_", [&](auto tag) {
    launch_elementwise<5, decltype(tag), NoExtra>(lists, nullptr, op);
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// sampa_update_: lists w (written), backup x, g~, g_y, momentum buffer.

struct SampaUpdateOp {
  SgdCoeffs c;
  float one_minus_lam;
  float lam;

  __device__ NoCtx prepare(NoExtra) const { return {}; }
  __device__ unsigned reads(NoCtx) const {
    return 0b01110u | (c.has_momentum && !c.init_buffers ? 0b10000u : 0u);
  }
  __device__ unsigned writes(NoCtx) const { return 0b00001u | (c.has_momentum ? 0b10000u : 0u); }
  template <typename T>
  __device__ void apply(T (&e)[5], NoCtx) const {
    const float x = ld(e[1]);
    const float g = ld(e[2]) * one_minus_lam + lam * ld(e[3]);
    float new_buf = 0.0f;
    const bool read_buf = c.has_momentum && !c.init_buffers;
    const float d = sgd_direction(c, x, g, read_buf ? ld(e[4]) : 0.0f, &new_buf);
    if (c.has_momentum) e[4] = st<T>(new_buf);
    e[0] = st<T>(x + c.neg_lr * d);
  }
};

void sampa_update_(ListArg params, ListArg backups, ListArg grads_tilde,
                   ListArg grads_y, ListArg momentum_buffers, double lam, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, bool init_buffers) {
  const bool has_momentum = momentum != 0.0;
  SAM_FAST_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
                 "sampa_update_: momentum != 0 needs momentum_buffers");
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads_tilde", grads_tilde, true, false},
                   {"grads_y", grads_y, true, false},
                   {"momentum_buffers", has_momentum ? TensorList(momentum_buffers) : TensorList(),
                    !init_buffers, true}},
                  "sampa_update_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const SampaUpdateOp op{make_sgd_coeffs(lr, momentum, dampening, weight_decay, nesterov,
                                         maximize, init_buffers),
                         static_cast<float>(1.0 - lam), static_cast<float>(lam)};
  dispatch_storage(lists.dtype(), "sampa_update_", [&](auto tag) {
    launch_elementwise<5, decltype(tag), NoExtra>(lists, nullptr, op);
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// The SAM family's generic ops (sam_fast/family_ops.py; specification:
// sam_fast/backends/torch_family.py; per-element math: family.h). Storage
// fp32, fp16, bf16 and fp64 (math in fp64 then, as in the specification).
// The reductions are grad_sumsq's: per-block partials of a fixed tree, then
// one block per result sums them in a fixed order (no atomics). The kernel
// bodies see raw pointers and scalars only; the host wrappers after them do
// the ATen work.

__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double) {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// A device flag (ema_residual_'s skip): fp32 as GradScaler makes it, any
// other dtype as fp64 (exact for every float, and non-zero stays non-zero).
struct DeviceFlag {
  const float* f;   // null unless the flag is fp32
  const double* d;  // null unless the flag is fp64
  __device__ __forceinline__ bool set() const {
    return f != nullptr ? *f != 0.0f : (d != nullptr && *d != 0.0);
  }
};

// Where each block of the call writes its partials (nsums per block).
template <typename Acc>
struct PartialsArgs {
  Acc* partials;        // [nsums][blocks of the whole call]
  int64_t blocks;       // the row length
  int64_t first_block;  // blocks launched before this launch
};

// The chunk of this block: its tensor, first element and length.
template <int Depth, typename Extra, bool kLarge>
__device__ __forceinline__ int64_t block_chunk(const TensorListMetadata<Depth, Extra, kLarge>& meta,
                                               int* t, int64_t* start) {
  *t = meta.block_to_tensor[blockIdx.x];
  *start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = meta.numel[*t] - *start;
  return remaining < kChunkSize ? remaining : kChunkSize;
}

// Sum row blockIdx.x of the partials in a fixed order (in double), NaN where
// skip is set.
template <typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    family_sums_kernel(const Acc* partials, int64_t n, Acc* out, const DeviceFlag skip) {
  const Acc* row = partials + blockIdx.x * n;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += row[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = skip.set() ? quiet_nan(Acc{}) : static_cast<Acc>(acc);
}

// -- dot_sumsq: lists a, b; three partials per block.

template <typename T, typename Acc, bool kLarge>
__device__ __forceinline__ void dot_sumsq_body(const TensorListMetadata<2, NoExtra, kLarge>& meta,
                                               const PartialsArgs<Acc>& out) {
  int t;
  int64_t start;
  const int64_t n = block_chunk(meta, &t, &start);
  const T* a = static_cast<const T*>(meta.addresses[0][t]) + start;
  const T* b = static_cast<const T*>(meta.addresses[1][t]) + start;
  const bool aligned =
      reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  Acc ab = Acc(0), aa = Acc(0), bb = Acc(0);
  int64_t done = 0;
  if (aligned) {
    using V = Vec16<T>;
    const int64_t nvec = n / V::kSize;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const V av = reinterpret_cast<const V*>(a)[i];
      const V bv = reinterpret_cast<const V*>(b)[i];
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        const Acc x = static_cast<Acc>(av.v[j]);
        const Acc y = static_cast<Acc>(bv.v[j]);
        ab += x * y;
        aa += x * x;
        bb += y * y;
      }
    }
    done = nvec * V::kSize;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    const Acc x = static_cast<Acc>(a[i]);
    const Acc y = static_cast<Acc>(b[i]);
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  // block_sum's shared slots are reused: every warp must be past one sum's
  // read before the next sum writes them.
  ab = block_sum(ab);
  __syncthreads();
  aa = block_sum(aa);
  __syncthreads();
  bb = block_sum(bb);
  if (threadIdx.x == 0) {
    const int64_t k = out.first_block + blockIdx.x;
    out.partials[k] = ab;
    out.partials[out.blocks + k] = aa;
    out.partials[2 * out.blocks + k] = bb;
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    dot_sumsq_kernel(const TensorListMetadata<2, NoExtra, false> meta,
                     const PartialsArgs<Acc> out) {
  dot_sumsq_body<T>(meta, out);
}

#if SAMF_LARGE_PARAMS
template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    dot_sumsq_kernel(const TensorListMetadata<2, NoExtra, true> meta, const PartialsArgs<Acc> out)
#if SAMF_LARGE_KERNEL_DEFINED
{
  dot_sumsq_body<T>(meta, out);
}
#else
    ;
#endif
#endif

int64_t total_blocks(const FlatLists& lists) {
  int64_t blocks = 0;
  for (size_t j = 0; j < lists.size(); ++j) blocks += chunks_of(lists.numel(j));
  return blocks;
}

void check_same_length(ListArg first, ListArg second, const char* op,
                       const char* first_name, const char* second_name) {
  SAM_FAST_CHECK(second.size() == first.size(), op, ": ", second_name, " has ", second.size(),
                 " tensors but ", first_name, " has ", first.size());
}

Tensor dot_sumsq(ListArg a, ListArg b) {
  SAM_FAST_CHECK(!a.empty(), "dot_sumsq needs at least one tensor");
  check_same_length(a, b, "dot_sumsq", "a", "b");
  FlatLists lists({{"a", a, true, false}, {"b", b, true, false}}, "dot_sumsq");
  const DeviceGuard guard(lists.device());
  const ScalarType math = family_math_dtype(lists.dtype());
  const Device device = a[0].device();
  Tensor out = empty_1d(3, math, device);
  const int64_t blocks = total_blocks(lists);
  Tensor partials = empty_1d(3 * (blocks > 0 ? blocks : 1), math, device);
  const cudaStream_t stream = current_stream(device.index());
  dispatch_family(lists.dtype(), "dot_sumsq", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const PartialsArgs<Acc> args{partials.mutable_data_ptr<Acc>(), blocks, 0};
    multi_tensor_apply<2, NoExtra>(
        lists.device().index(), list_pointers<2>(lists), lists.numels().data(), lists.size(),
        static_cast<const NoExtra*>(nullptr), [&](const auto& meta, int nb, int64_t first) {
          PartialsArgs<Acc> launch_args = args;
          launch_args.first_block = first;
          dot_sumsq_kernel<T><<<nb, kBlockSize, 0, stream>>>(meta, launch_args);
          SAM_FAST_CUDA_LAUNCH_CHECK();
        });
    family_sums_kernel<Acc><<<3, kBlockSize, 0, stream>>>(
        partials.mutable_data_ptr<Acc>(), blocks, out.mutable_data_ptr<Acc>(),
        DeviceFlag{nullptr, nullptr});
    SAM_FAST_CUDA_LAUNCH_CHECK();
  });
  return out;
}

// -- combine_: lists a (read, written), b.

template <typename Acc>
struct CombineCtx {
  Acc c0;
  Acc c1;
};

template <typename Acc>
struct CombineOp {
  const Acc* coef;  // two elements on the device, in the math dtype

  __device__ CombineCtx<Acc> prepare(NoExtra) const { return {coef[0], coef[1]}; }
  __device__ unsigned reads(const CombineCtx<Acc>&) const { return 0b11u; }
  __device__ unsigned writes(const CombineCtx<Acc>&) const { return 0b01u; }
  template <typename T>
  __device__ void apply(T (&e)[2], const CombineCtx<Acc>& c) const {
    e[0] = static_cast<T>(
        combine_value(static_cast<Acc>(e[0]), static_cast<Acc>(e[1]), c.c0, c.c1));
  }
};

void combine_(ListArg a, ListArg b, const Tensor& coef) {
  check_same_length(a, b, "combine_", "a", "b");
  SAM_FAST_CHECK(coef.numel() == 2, "combine_: coef must hold two elements, got shape ",
                 shape_str(coef));
  FlatLists lists({{"a", a, true, true}, {"b", b, true, false}}, "combine_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  // In the math dtype on the device, as torch_family does (coef.to(math)): no copy
  // when it is there already.
  const Tensor c =
      contiguous_of(to_device(coef, lists.device(), family_math_dtype(lists.dtype())));
  dispatch_family(lists.dtype(), "combine_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    launch_elementwise<2, T, NoExtra>(lists, nullptr, CombineOp<Acc>{c.mutable_data_ptr<Acc>()});
  });
  lists.finish();
}

// -- ema_residual_: lists m, g (both read and written); one partial per block.

template <typename Acc>
struct EmaArgs {
  EmaCoeffs<Acc> c;       // inv_scale: set in the kernel from grad_scale
  const Acc* grad_scale;  // null without GradScaler
  DeviceFlag skip;
  PartialsArgs<Acc> out;
};

template <typename T, typename Acc>
__device__ __forceinline__ Acc ema_element(T& m, T& g, const EmaCoeffs<Acc>& c) {
  Acc next, d;
  ema_values(c, static_cast<Acc>(m), static_cast<Acc>(g), &next, &d);
  const T stored = static_cast<T>(d);
  m = static_cast<T>(next);
  g = stored;
  const Acc back = static_cast<Acc>(stored);
  return back * back;
}

template <typename T, typename Acc, bool kLarge>
__device__ __forceinline__ void ema_residual_body(const TensorListMetadata<2, NoExtra, kLarge>& meta,
                                                  const EmaArgs<Acc>& a) {
  int t;
  int64_t start;
  const int64_t n = block_chunk(meta, &t, &start);
  const int64_t slot = a.out.first_block + blockIdx.x;
  // A skipped step (the flag is the same for every block): nothing read or
  // written; the sums kernel reports NaN.
  if (a.skip.set()) {
    if (threadIdx.x == 0) a.out.partials[slot] = Acc(0);
    return;
  }
  EmaCoeffs<Acc> c = a.c;
  c.inv_scale = a.grad_scale != nullptr ? rn_rcp(*a.grad_scale) : Acc(1);
  T* m = static_cast<T*>(meta.addresses[0][t]) + start;
  T* g = static_cast<T*>(meta.addresses[1][t]) + start;
  const bool aligned =
      reinterpret_cast<uintptr_t>(m) % 16 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0;
  Acc acc = Acc(0);
  int64_t done = 0;
  if (aligned) {
    using V = Vec16<T>;
    const int64_t nvec = n / V::kSize;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      V mv = reinterpret_cast<const V*>(m)[i];
      V gv = reinterpret_cast<const V*>(g)[i];
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) acc += ema_element(mv.v[j], gv.v[j], c);
      reinterpret_cast<V*>(m)[i] = mv;
      reinterpret_cast<V*>(g)[i] = gv;
    }
    done = nvec * V::kSize;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    T mi = m[i];
    T gi = g[i];
    acc += ema_element(mi, gi, c);
    m[i] = mi;
    g[i] = gi;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) a.out.partials[slot] = acc;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    ema_residual_kernel(const TensorListMetadata<2, NoExtra, false> meta, const EmaArgs<Acc> a) {
  ema_residual_body<T>(meta, a);
}

#if SAMF_LARGE_PARAMS
template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    ema_residual_kernel(const TensorListMetadata<2, NoExtra, true> meta, const EmaArgs<Acc> a)
#if SAMF_LARGE_KERNEL_DEFINED
{
  ema_residual_body<T>(meta, a);
}
#else
    ;
#endif
#endif

Tensor ema_residual_(ListArg m, ListArg g, double decay, double sigma,
                         bool updated, OptTensorArg grad_scale,
                         OptTensorArg skip) {
  SAM_FAST_CHECK(!m.empty(), "ema_residual_ needs at least one tensor");
  check_same_length(m, g, "ema_residual_", "m", "g");
  FlatLists lists({{"m", m, true, true}, {"g", g, true, true}}, "ema_residual_");
  const DeviceGuard guard(lists.device());
  const Device device = lists.device();
  const ScalarType math = family_math_dtype(lists.dtype());
  // Device copies of the scalars (none where they are there already), alive for the launches.
  std::optional<Tensor> gs;
  if (grad_scale.has_value()) {
    SAM_FAST_CHECK(grad_scale->numel() == 1, "grad_scale must hold one element, got shape ",
                   shape_str(*grad_scale));
    gs = to_device(*grad_scale, device, math);
  }
  std::optional<Tensor> flag;
  DeviceFlag skip_flag{nullptr, nullptr};
  if (skip.has_value()) {
    SAM_FAST_CHECK(skip->numel() == 1, "skip must hold one element, got shape ", shape_str(*skip));
    if (skip->scalar_type() == kFloat) {
      flag = to_device(*skip, device, kFloat);
      skip_flag.f = flag->mutable_data_ptr<float>();
    } else {
      flag = to_device(*skip, device, kDouble);
      skip_flag.d = flag->mutable_data_ptr<double>();
    }
  }
  Tensor out = empty_scalar(math, m[0].device());
  const int64_t blocks = total_blocks(lists);
  Tensor partials = empty_1d(blocks > 0 ? blocks : 1, math, m[0].device());
  const cudaStream_t stream = current_stream(device.index());
  dispatch_family(lists.dtype(), "ema_residual_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const EmaArgs<Acc> args{
        {static_cast<Acc>(decay), static_cast<Acc>(1.0 - decay), static_cast<Acc>(sigma), Acc(1),
         updated},
        gs.has_value() ? gs->mutable_data_ptr<Acc>() : nullptr,
        skip_flag,
        {partials.mutable_data_ptr<Acc>(), blocks, 0}};
    multi_tensor_apply<2, NoExtra>(
        device.index(), list_pointers<2>(lists), lists.numels().data(), lists.size(),
        static_cast<const NoExtra*>(nullptr), [&](const auto& meta, int nb, int64_t first) {
          EmaArgs<Acc> launch_args = args;
          launch_args.out.first_block = first;
          ema_residual_kernel<T><<<nb, kBlockSize, 0, stream>>>(meta, launch_args);
          SAM_FAST_CUDA_LAUNCH_CHECK();
        });
    family_sums_kernel<Acc><<<1, kBlockSize, 0, stream>>>(partials.mutable_data_ptr<Acc>(), blocks,
                                                         out.mutable_data_ptr<Acc>(), skip_flag);
    SAM_FAST_CUDA_LAUNCH_CHECK();
  });
  lists.finish();
  return out;
}


// ---------------------------------------------------------------------------
// BSAM's three ops (sam_fast/bsam_ops.py; specification:
// sam_fast/backends/torch_bsam.py; per-element math: bsam.h). Storage fp32,
// fp16, bf16 and fp64 (math in fp64 then); the noise is fp32 whatever the
// group's dtype. The square roots are rn_sqrt: torch.sqrt is correctly rounded
// on CUDA. grad_scale and skip are read in the kernels (no host sync): a
// skipped ascent is w <- backup, gs <- 0, a skipped update w <- backup.

// -- bsam_noise_: lists w (read, written), backup (written), z (fp32), s.
// Not on elementwise_body, whose lists share one element type: the same
// scheme, with z loaded as fp32 (kSize of them where w's vector has kSize).

// Checked before any early return, as on the CPU: a group of only empty
// tensors of another dtype is refused too.
void check_bsam_dtype(ScalarType dtype, const char* op) {
  dispatch_family(dtype, op, [](auto) {});
}

template <int N>
struct alignas(4 * N) FloatVec {
  float v[N];
};

template <typename Acc>
struct NoiseArgs {
  Acc num_data;
};

template <typename T, typename Acc, bool kLarge>
__device__ __forceinline__ void bsam_noise_body(const TensorListMetadata<4, NoExtra, kLarge>& meta,
                                                const NoiseArgs<Acc>& a) {
  int t;
  int64_t start;
  const int64_t n = block_chunk(meta, &t, &start);
  T* w = static_cast<T*>(meta.addresses[0][t]) + start;
  T* b = static_cast<T*>(meta.addresses[1][t]) + start;
  const float* z = static_cast<const float*>(meta.addresses[2][t]) + start;
  const T* s = static_cast<const T*>(meta.addresses[3][t]) + start;
  using V = Vec16<T>;
  using Z = FloatVec<V::kSize>;
  const bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(s) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(z) % alignof(Z) == 0;
  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / V::kSize;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      V wv = reinterpret_cast<const V*>(w)[i];
      const V sv = reinterpret_cast<const V*>(s)[i];
      const Z zv = reinterpret_cast<const Z*>(z)[i];
      reinterpret_cast<V*>(b)[i] = wv;
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        const Acc sigma = rn_sqrt(bsam_noise_variance(static_cast<Acc>(sv.v[j]), a.num_data));
        wv.v[j] = static_cast<T>(
            bsam_noisy(static_cast<Acc>(wv.v[j]), static_cast<Acc>(zv.v[j]), sigma));
      }
      reinterpret_cast<V*>(w)[i] = wv;
    }
    done = nvec * V::kSize;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    const T wi = w[i];
    b[i] = wi;
    const Acc sigma = rn_sqrt(bsam_noise_variance(static_cast<Acc>(s[i]), a.num_data));
    w[i] = static_cast<T>(bsam_noisy(static_cast<Acc>(wi), static_cast<Acc>(z[i]), sigma));
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    bsam_noise_kernel(const TensorListMetadata<4, NoExtra, false> meta, const NoiseArgs<Acc> a) {
  bsam_noise_body<T>(meta, a);
}

#if SAMF_LARGE_PARAMS
template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockSize)
    bsam_noise_kernel(const TensorListMetadata<4, NoExtra, true> meta, const NoiseArgs<Acc> a)
#if SAMF_LARGE_KERNEL_DEFINED
{
  bsam_noise_body<T>(meta, a);
}
#else
    ;
#endif
#endif

void bsam_noise_(ListArg params, ListArg backups, ListArg noise,
                 ListArg s, double num_data) {
  check_same_length(params, backups, "bsam_noise_", "params", "backups");
  check_same_length(params, noise, "bsam_noise_", "params", "noise");
  check_same_length(params, s, "bsam_noise_", "params", "s");
  FlatLists lists({{"params", params, true, true},
                   {"backups", backups, false, true},
                   {"noise", noise, true, false, kFloat},
                   {"s", s, true, false}},
                  "bsam_noise_");
  check_bsam_dtype(lists.dtype(), "bsam_noise_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const cudaStream_t stream = current_stream(lists.device().index());
  dispatch_family(lists.dtype(), "bsam_noise_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const NoiseArgs<Acc> args{static_cast<Acc>(num_data)};
    multi_tensor_apply<4, NoExtra>(
        lists.device().index(), list_pointers<4>(lists), lists.numels().data(), lists.size(),
        static_cast<const NoExtra*>(nullptr), [&](const auto& meta, int nb, int64_t) {
          bsam_noise_kernel<T><<<nb, kBlockSize, 0, stream>>>(meta, args);
          SAM_FAST_CUDA_LAUNCH_CHECK();
        });
  });
  lists.finish();
}

// The device scalars of bsam_ascent_ and bsam_update_: the grad scale in the
// math dtype (null without GradScaler) and the skip flag.
template <typename Acc>
struct BsamScalars {
  const Acc* grad_scale;
  DeviceFlag skip;

  __device__ __forceinline__ Acc inv_scale() const {
    return grad_scale != nullptr ? rn_rcp(*grad_scale) : Acc(1);
  }
};

template <typename Acc>
struct BsamCtx {
  Acc inv_scale;
  bool skip;
};

// Device copies of grad_scale (in the math dtype) and skip (fp32 as given,
// any other dtype as fp64), alive for the launches; none where they are
// there already.
struct BsamDeviceScalars {
  std::optional<Tensor> grad_scale;
  std::optional<Tensor> skip;
  DeviceFlag flag{nullptr, nullptr};

  BsamDeviceScalars(OptTensorArg gs, OptTensorArg sk,
                    Device device, ScalarType math) {
    if (gs.has_value()) {
      SAM_FAST_CHECK(gs->numel() == 1, "grad_scale must hold one element, got shape ", shape_str(*gs));
      grad_scale = to_device(*gs, device, math);
    }
    if (sk.has_value()) {
      SAM_FAST_CHECK(sk->numel() == 1, "skip must hold one element, got shape ", shape_str(*sk));
      if (sk->scalar_type() == kFloat) {
        skip = to_device(*sk, device, kFloat);
        flag.f = skip->mutable_data_ptr<float>();
      } else {
        skip = to_device(*sk, device, kDouble);
        flag.d = skip->mutable_data_ptr<double>();
      }
    }
  }

  template <typename Acc>
  BsamScalars<Acc> args() const {
    return {grad_scale.has_value() ? grad_scale->mutable_data_ptr<Acc>() : nullptr, flag};
  }
};

// -- bsam_ascent_: lists w (written), backup, g, s, gs (written).

template <typename Acc>
struct BsamAscentOp {
  Acc rho;
  BsamScalars<Acc> scalars;

  __device__ BsamCtx<Acc> prepare(NoExtra) const {
    return {scalars.inv_scale(), scalars.skip.set()};
  }
  __device__ unsigned reads(const BsamCtx<Acc>& c) const { return c.skip ? 0b00010u : 0b01110u; }
  __device__ unsigned writes(const BsamCtx<Acc>&) const { return 0b10001u; }
  template <typename T>
  __device__ void apply(T (&e)[5], const BsamCtx<Acc>& c) const {
    if (c.skip) {
      e[0] = e[1];
      e[4] = static_cast<T>(Acc(0));
      return;
    }
    const Acc s = static_cast<Acc>(e[3]);
    Acc w, gs;
    bsam_ascent_values(BsamAscentCoeffs<Acc>{rho, c.inv_scale}, static_cast<Acc>(e[1]),
                       static_cast<Acc>(e[2]), s, rn_sqrt(s), &w, &gs);
    e[0] = static_cast<T>(w);
    e[4] = static_cast<T>(gs);
  }
};

void bsam_ascent_(ListArg params, ListArg backups, ListArg grads,
                  ListArg s, ListArg gs, double rho,
                  OptTensorArg grad_scale,
                  OptTensorArg skip) {
  check_same_length(params, backups, "bsam_ascent_", "params", "backups");
  check_same_length(params, grads, "bsam_ascent_", "params", "grads");
  check_same_length(params, s, "bsam_ascent_", "params", "s");
  check_same_length(params, gs, "bsam_ascent_", "params", "gs");
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"s", s, true, false},
                   {"gs", gs, false, true}},
                  "bsam_ascent_");
  check_bsam_dtype(lists.dtype(), "bsam_ascent_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const BsamDeviceScalars scalars(grad_scale, skip, lists.device(),
                                  family_math_dtype(lists.dtype()));
  dispatch_family(lists.dtype(), "bsam_ascent_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    launch_elementwise<5, T, NoExtra>(
        lists, nullptr, BsamAscentOp<Acc>{static_cast<Acc>(rho), scalars.args<Acc>()});
  });
  lists.finish();
}

// -- bsam_update_: lists w (written), backup, g, m (read, written), s (read,
// written), gs.

template <typename Acc>
struct BsamUpdateOp {
  BsamUpdateCoeffs<Acc> c;  // inv_scale: set in the kernel from grad_scale
  BsamScalars<Acc> scalars;

  __device__ BsamCtx<Acc> prepare(NoExtra) const {
    return {scalars.inv_scale(), scalars.skip.set()};
  }
  __device__ unsigned reads(const BsamCtx<Acc>& x) const {
    return x.skip ? 0b000010u : 0b111110u;
  }
  __device__ unsigned writes(const BsamCtx<Acc>& x) const {
    return x.skip ? 0b000001u : 0b011001u;
  }
  template <typename T>
  __device__ void apply(T (&e)[6], const BsamCtx<Acc>& x) const {
    if (x.skip) {
      e[0] = e[1];
      return;
    }
    BsamUpdateCoeffs<Acc> k = c;
    k.inv_scale = x.inv_scale;
    Acc w, m, s;
    bsam_update_values(k, static_cast<Acc>(e[1]), static_cast<Acc>(e[2]),
                       static_cast<Acc>(e[3]), static_cast<Acc>(e[4]), static_cast<Acc>(e[5]),
                       &w, &m, &s);
    e[0] = static_cast<T>(w);
    e[3] = static_cast<T>(m);
    e[4] = static_cast<T>(s);
  }
};

void bsam_update_(ListArg params, ListArg backups, ListArg grads,
                  ListArg m, ListArg s, ListArg gs, double lr,
                  double beta1, double beta2, double weight_decay, double damping, bool new_s,
                  OptTensorArg grad_scale,
                  OptTensorArg skip) {
  check_same_length(params, backups, "bsam_update_", "params", "backups");
  check_same_length(params, grads, "bsam_update_", "params", "grads");
  check_same_length(params, m, "bsam_update_", "params", "m");
  check_same_length(params, s, "bsam_update_", "params", "s");
  check_same_length(params, gs, "bsam_update_", "params", "gs");
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"m", m, true, true},
                   {"s", s, true, true},
                   {"gs", gs, true, false}},
                  "bsam_update_");
  check_bsam_dtype(lists.dtype(), "bsam_update_");
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const BsamDeviceScalars scalars(grad_scale, skip, lists.device(),
                                  family_math_dtype(lists.dtype()));
  dispatch_family(lists.dtype(), "bsam_update_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const BsamUpdateCoeffs<Acc> c{static_cast<Acc>(lr),
                                  static_cast<Acc>(beta1),
                                  static_cast<Acc>(1.0 - beta1),
                                  static_cast<Acc>(beta2),
                                  static_cast<Acc>(1.0 - beta2),
                                  static_cast<Acc>(weight_decay),
                                  static_cast<Acc>(damping + weight_decay),
                                  Acc(1),
                                  new_s};
    launch_elementwise<6, T, NoExtra>(lists, nullptr,
                                      BsamUpdateOp<Acc>{c, scalars.args<Acc>()});
  });
  lists.finish();
}

}  // namespace

// Every op's CUDA kernel, in either build (csrc/api.h). The portable library only adds
// CUDA kernels: the schemas are sam_fast._C_stable's (and family_ops.py's, bsam_ops.py's).
SAM_FAST_LIBRARY_IMPL(CUDA, m) { SAM_FAST_IMPL_EVERY_OP(m); }

}  // namespace sam_fast::cuda
