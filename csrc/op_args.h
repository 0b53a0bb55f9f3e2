// Host-side argument handling shared by the CPU and CUDA implementations:
// validating the aligned tensor lists, bringing them to one flat memory
// layout, and turning the Python-float options into the fp32 coefficients
// the kernels use (rounded once, as torch's opmath does).
//
// Header-only on purpose: the CUDA kernels may be compiled just in time into
// a library of their own (sam_fast/_extension.py), which needs this too.
#pragma once

#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "api.h"
#include "elementwise.h"

namespace sam_fast {

// One aligned tensor list of an op: its name (for messages), whether the
// kernel reads and/or writes it, and whether it may be empty (an absent
// optional list, e.g. momentum buffers when momentum == 0), and its dtype
// when that is not the group's (the first list's): BSAM's fp32 noise.
struct ListSpec {
  const char* name;
  TensorList tensors;
  bool read;
  bool written;
  ScalarType dtype = kUndefined;  // Undefined: the group's dtype
};

// Strides that agree wherever they matter (dimensions of size > 1): then
// element k of one tensor's memory is element k of the other's.
inline bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// The lists of one op call as flat arrays of equal length: position i of every
// list points at numel[i] elements laid out alike, so a kernel can treat them
// as 1-d. Parameters are dense in practice (then nothing is copied); any
// other layout (a strided view, a gradient whose strides differ from its
// parameter's) is staged through a temporary in the first list's layout and
// written back by finish(), so every layout gives the correct result.
class FlatLists {
 public:
  // Per call this is O(tensors x lists) with a small constant: the usual case
  // (every tensor contiguous) is decided from cached TensorImpl flags, and no
  // tensor is copied into a vector (a Tensor copy is an atomic refcount
  // round trip, and for a tensor made in Python the last one takes the GIL):
  // only staged temporaries are kept.
  FlatLists(std::initializer_list<ListSpec> specs, const char* op)
      : specs_(specs.begin(), specs.end()) {
    SAM_FAST_CHECK(specs.size() > 0, op, ": no tensor lists");
    const auto& lead = specs_[0].tensors;
    const size_t n = lead.size();
    ptrs_.resize(specs_.size());
    for (size_t k = 0; k < specs_.size(); ++k) {
      const size_t len = specs_[k].tensors.size();
      SAM_FAST_CHECK(len == n || (len == 0 && k > 0), op, ": ", specs_[k].name, " has ", len,
                     " tensors but ", specs_[0].name, " has ", n);
      if (len > 0) ptrs_[k].reserve(n);
    }
    numel_.reserve(n);
    index_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const Tensor& ref = lead[i];
      SAM_FAST_CHECK(ref.defined(), op, ": ", specs_[0].name, "[", i, "] is undefined");
      if (i == 0) {
        device_ = ref.device();
        dtype_ = ref.scalar_type();
      }
      SAM_FAST_CHECK(ref.device() == device_, op, ": ", specs_[0].name, "[", i, "] is on ",
                     device_str(ref.device()), " but ", specs_[0].name, "[0] is on ",
                     device_str(device_),
                     "; call the op once per device");
      SAM_FAST_CHECK(ref.scalar_type() == dtype_, op, ": ", specs_[0].name, "[", i, "] is ",
                     ref.scalar_type(), " but ", specs_[0].name, "[0] is ", dtype_,
                     "; call the op once per dtype");
      if (ref.numel() == 0) continue;
      const bool ref_contiguous = ref.is_contiguous();
      const bool ref_dense = ref_contiguous || is_dense(ref);
      for (size_t k = 0; k < specs_.size(); ++k) {
        const ListSpec& spec = specs_[k];
        if (spec.tensors.empty()) continue;
        const Tensor& t = spec.tensors[i];
        const ScalarType want =
            spec.dtype == kUndefined ? dtype_ : spec.dtype;
        // The first list's tensor is ref itself, checked above.
        if (k > 0) {
          SAM_FAST_CHECK(t.defined(), op, ": ", spec.name, "[", i, "] is undefined");
          SAM_FAST_CHECK(t.device() == device_, op, ": ", spec.name, "[", i, "] is on ",
                         device_str(t.device()), " but ", specs_[0].name, "[", i, "] is on ",
                         device_str(device_));
          if (spec.dtype == kUndefined) {
            SAM_FAST_CHECK(t.scalar_type() == dtype_, op, ": ", spec.name, "[", i, "] is ",
                           t.scalar_type(), " but ", specs_[0].name, "[", i, "] is ", dtype_,
                           "; every list of a group must share the parameters' dtype");
          } else {
            SAM_FAST_CHECK(t.scalar_type() == want, op, ": ", spec.name, "[", i, "] is ",
                           t.scalar_type(), "; the kernels take ", want, " ", spec.name);
          }
          SAM_FAST_CHECK(same_sizes(t, ref), op, ": ", spec.name, "[", i, "] has shape ",
                         shape_str(t), " but ", specs_[0].name, "[", i, "] has ", shape_str(ref));
        }
        // Both contiguous (the usual case): the same layout, and a contiguous
        // tensor has no elements sharing memory, so neither check is needed.
        const bool direct =
            k == 0 ? ref_dense
                   : (ref_contiguous && t.is_contiguous()) ||
                         (ref_dense && is_dense(t) && same_layout(t, ref));
        if (spec.written && !direct) {
          SAM_FAST_CHECK(!has_internal_overlap(t), op, ": ", spec.name,
                         "[", i, "] has elements that share memory (an expanded view?); it "
                         "cannot be written in place");
        }
        if (direct) {
          // Written lists: mutable_data_ptr (a copy-on-write tensor materializes);
          // read-only ones must not be materialized by a read.
          ptrs_[k].push_back(spec.written ? t.mutable_data_ptr()
                                          : const_cast<void*>(t.const_data_ptr()));
          continue;
        }
        Tensor flat = staging_like(ref, want, ref_dense);
        if (spec.read) copy_into(flat, t);
        if (spec.written) write_back_.emplace_back(t, flat);
        ptrs_[k].push_back(flat.mutable_data_ptr());
        staged_.push_back(std::move(flat));
      }
      numel_.push_back(ref.numel());
      index_.push_back(static_cast<int64_t>(i));
    }
  }

  // Copies staged outputs back into the caller's tensors.
  void finish() {
    for (auto& [dst, src] : write_back_) copy_into(dst, src);
    write_back_.clear();
  }

  // Tensors with at least one element (empty ones need no work).
  size_t size() const { return numel_.size(); }
  bool empty() const { return numel_.empty(); }
  int64_t numel(size_t j) const { return numel_[j]; }
  const std::vector<int64_t>& numels() const { return numel_; }
  // Position in the caller's lists of the j-th non-empty tensor.
  int64_t index(size_t j) const { return index_[j]; }
  // Data pointers of list k, one per non-empty tensor (empty when the list is absent).
  const std::vector<void*>& ptrs(size_t k) const { return ptrs_[k]; }
  ScalarType dtype() const { return dtype_; }
  Device device() const { return device_; }

 private:
  SmallVec<ListSpec, 6> specs_;
  SmallVec<std::vector<void*>, 6> ptrs_;
  std::vector<int64_t> numel_;
  std::vector<int64_t> index_;
  std::vector<Tensor> staged_;
  std::vector<std::pair<Tensor, Tensor>> write_back_;
  Device device_ = cpu_device();
  ScalarType dtype_{kFloat};
};

// The storage dtypes the compiled kernels handle (fp64 groups stay with the
// torch backend: see sam_fast/_compiled_ops.py).
inline void check_storage_dtype(ScalarType dtype, const char* op) {
  SAM_FAST_CHECK(dtype == kFloat || dtype == kHalf || dtype == kBFloat16, op,
                 ": the compiled kernels take float32, float16 and bfloat16 tensors, got ", dtype,
                 " (the Python backends hand float64 groups to the torch backend)");
}

// Calls f(T{}) for the storage dtype of a group of the section 3 ops (fp32, fp16, bf16).
template <typename F>
void dispatch_storage(ScalarType dtype, const char* op, const F& f) {
  check_storage_dtype(dtype, op);
  switch (dtype) {
    case kFloat:
      f(float{});
      break;
    case kHalf:
      f(Half{});
      break;
    default:
      f(BFloat16{});
      break;
  }
}

// A one-element device scalar (grad_scale, found_inf) as fp32 on `device`.
// Already there in fp32 it is used as is: no copy, no host sync (and no view:
// the kernels read the one element at its data pointer, whatever its shape).
inline Tensor scalar_on(const Tensor& s, Device device, const char* what) {
  SAM_FAST_CHECK(s.numel() == 1, what, " must hold one element, got shape ", shape_str(s));
  return to_device(s, device, kFloat);
}

// What perturb_ / sampa_points_ derive their scale from: the global sum of
// squares on `device`, fp64 if it is fp64 (the torch backend then computes the
// scale in fp64) and fp32 otherwise, and grad_scale in the same dtype (as the
// torch backend's grad_scale.to(norm)). Already there, they are used as they
// are: no copy, no host sync.
struct ScaleInputs {
  Tensor sumsq;
  std::optional<Tensor> grad_scale;
  bool is_double;
};

inline ScaleInputs scale_inputs(const Tensor& sumsq,
                                const std::optional<Tensor>& grad_scale, Device device) {
  SAM_FAST_CHECK(sumsq.numel() == 1, "sumsq must hold one element, got shape ", shape_str(sumsq));
  const bool is_double = sumsq.scalar_type() == kDouble;
  const ScalarType acc = is_double ? kDouble : kFloat;
  ScaleInputs in{to_device(sumsq, device, acc), std::nullopt, is_double};
  if (grad_scale.has_value()) {
    SAM_FAST_CHECK(grad_scale->numel() == 1, "grad_scale must hold one element, got shape ",
                   shape_str(*grad_scale));
    in.grad_scale = to_device(*grad_scale, device, acc);
  }
  return in;
}

inline SgdCoeffs make_sgd_coeffs(double lr, double momentum, double dampening,
                                 double weight_decay, bool nesterov, bool maximize,
                                 bool init_buffers) {
  SgdCoeffs c;
  c.neg_lr = static_cast<float>(-lr);
  c.momentum = static_cast<float>(momentum);
  c.one_minus_damp = static_cast<float>(1.0 - dampening);
  c.weight_decay = static_cast<float>(weight_decay);
  c.has_momentum = momentum != 0.0;
  c.has_weight_decay = weight_decay != 0.0;
  c.nesterov = nesterov;
  c.grad_sign = maximize ? -1.0f : 1.0f;
  c.init_buffers = init_buffers;
  return c;
}

inline AdamCoeffs make_adam_coeffs(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, bool amsgrad, bool maximize,
                                   bool decoupled) {
  AdamCoeffs c;
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.lerp_weight = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.weight_decay = static_cast<float>(weight_decay);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.neg_lr = static_cast<float>(-lr);
  c.grad_sign = maximize ? -1.0f : 1.0f;
  c.x_factor = (weight_decay != 0.0 && decoupled) ? c.decay_factor : 1.0f;
  c.coupled_decay = weight_decay != 0.0 && !decoupled;
  c.amsgrad = amsgrad;
  return c;
}

// Host-resident step counters: bump each by one (the caller has already
// decided the step is not skipped) and return its bias corrections, computed
// in double from the new count as torch.optim.Adam does on the host.
inline std::vector<AdamStepScalars> bump_host_steps(TensorList steps, const FlatLists& lists,
                                                    double lr, double beta1, double beta2) {
  std::vector<AdamStepScalars> out;
  out.reserve(lists.size());
  std::vector<double> counts(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const Tensor& s = steps[i];
    SAM_FAST_CHECK(s.numel() == 1, "restore_adamw_: state_steps[", i, "] must hold one element");
    double c;
    if (s.scalar_type() == kFloat) {
      float* p = s.mutable_data_ptr<float>();
      *p = *p + 1.0f;
      c = *p;
    } else if (s.scalar_type() == kDouble) {
      double* p = s.mutable_data_ptr<double>();
      *p = *p + 1.0;
      c = *p;
    } else {
      SAM_FAST_CHECK(false, "restore_adamw_: state_steps[", i, "] is ", s.scalar_type(),
                     "; Adam's step counters are float32 or float64");
    }
    counts[i] = c;
  }
  // The counters of a group almost always agree: three pow() per tensor were
  // most of this op's host time, so equal counts reuse the last corrections
  // (the same bits: pow is a function of its arguments).
  double last = std::nan("");
  AdamStepScalars sc{};
  for (size_t j = 0; j < lists.size(); ++j) {
    const double c = counts[lists.index(j)];
    if (!(c == last)) {
      sc.step_size = static_cast<float>((lr / (1.0 - std::pow(beta1, c))) * -1.0);
      sc.bc2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(beta2, c), 0.5));
      last = c;
    }
    out.push_back(sc);
  }
  return out;
}

// Where the step counters live: all on the host, or all on `device`.
inline bool steps_on_host(TensorList steps, Device device) {
  SAM_FAST_CHECK(steps.size() > 0, "restore_adamw_: state_steps is empty");
  const bool host = steps[0].device().is_cpu();
  for (size_t i = 0; i < steps.size(); ++i) {
    SAM_FAST_CHECK(steps[i].device().is_cpu() == host && (host || steps[i].device() == device),
                   "restore_adamw_: state_steps must all be on the host or all on ",
                   device_str(device),
                   "; state_steps[", i, "] is on ", device_str(steps[i].device()));
  }
  return host;
}

// The SAM family's and BSAM's ops (family.h, bsam.h): calls f(T{}) for the group's
// storage dtype, fp32, fp16, bf16 or fp64 (these ops take fp64 storage too).
template <typename F>
void dispatch_family(ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case kFloat:
      f(float{});
      break;
    case kHalf:
      f(Half{});
      break;
    case kBFloat16:
      f(BFloat16{});
      break;
    case kDouble:
      f(double{});
      break;
    default:
      SAM_FAST_CHECK(false, op,
                     ": the kernels take float32, float16, bfloat16 and float64 tensors, got ",
                     dtype);
  }
}

// Their math dtype: fp64 for fp64 storage, else fp32 (as torch_family.py computes).
inline ScalarType family_math_dtype(ScalarType storage) {
  return storage == kDouble ? kDouble : kFloat;
}

}  // namespace sam_fast
