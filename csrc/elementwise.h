// Per-element math of the fused ops (docs/design.md section 3), shared by the CPU
// kernels (cpu/kernels.cpp) and the CUDA kernels (cuda/kernels.cu).
//
// The executable specification is sam_fast/backends/torch_ops.py: every
// function here evaluates the same expressions, in the same order, as the
// torch._foreach_* calls there, in fp32 whatever the storage dtype. Where
// PyTorch's own CPU and CUDA kernels associate an expression differently
// (addcmul, addcdiv), the helpers below follow the device they run on, so
// each backend stays within an ulp or two of the torch backend on the same
// device. Scalars that torch receives as Python floats are rounded to fp32
// once on the host (as torch's opmath does) and arrive in the *Coeffs structs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SAMF_HD __host__ __device__ __forceinline__
#else
#define SAMF_HD inline
#endif

namespace sam_fast {

// Options of torch.optim.SGD, as they enter the arithmetic.
struct SgdCoeffs {
  float neg_lr;          // -lr: torch adds with alpha=-lr
  float momentum;        // mu
  float one_minus_damp;  // 1 - dampening (the alpha of the buffer update)
  float weight_decay;
  float grad_sign;       // -1 with maximize, else 1 (an exact factor)
  bool has_momentum;     // momentum != 0
  bool has_weight_decay; // weight_decay != 0 (0 * inf would be NaN)
  bool nesterov;
  bool init_buffers;     // first step: buf = d
};

// Options of torch.optim.Adam / AdamW.
struct AdamCoeffs {
  float beta1;
  float beta2;
  float lerp_weight;     // 1 - beta1 (exp_avg.lerp_(g, 1 - beta1))
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float decay_factor;    // 1 - lr * weight_decay (decoupled)
  float neg_lr;          // -lr (device step counters)
  float grad_sign;       // -1 with maximize, else 1
  float x_factor;        // decay_factor with decoupled weight decay, else 1
  bool coupled_decay;    // weight_decay != 0 and not decoupled: g += weight_decay * x
  bool amsgrad;
};

// Bias corrections of one tensor, from its step count c (already incremented).
struct AdamStepScalars {
  float step_size;  // host counters: -(lr / (1 - beta1^c)); device: -lr / (1 - beta1^c)
  float bc2_sqrt;   // sqrt(1 - beta2^c)
};

// The functions below are written as selects rather than branches: the
// conditions are loop-invariant options, and select form lets the compiler
// vectorize the CPU loops (both sides are cheap and never trap).

// torch.lerp's formula (ATen/native/Lerp.h): exact at both ends.
SAMF_HD float lerp(float self, float end, float weight) {
  const float near_self = self + weight * (end - self);
  const float near_end = end - (end - self) * (1.0f - weight);
  return std::fabs(weight) < 0.5f ? near_self : near_end;
}

// torch.maximum: NaN wins.
SAMF_HD float nan_max(float a, float b) {
  const float larger = a > b ? a : b;
  return a != a ? a : (b != b ? b : larger);
}

// a + s * b * c, associated as torch's foreach addcmul on this device.
SAMF_HD float addcmul(float a, float s, float b, float c) {
#if defined(__CUDA_ARCH__)
  return a + s * (b * c);
#else
  return a + s * b * c;
#endif
}

// a + s * b / c, associated as torch's foreach addcdiv on this device.
SAMF_HD float addcdiv(float a, float s, float b, float c) {
#if defined(__CUDA_ARCH__)
  return a + s * (b / c);
#else
  return a + s * b / c;
#endif
}

// ---------------------------------------------------------------------------
// The perturbation's scale from the global sum of squares (docs: op contract;
// spec: torch_ops.perturbation_scale). Each step is one correctly rounded
// operation, in the order PyTorch evaluates the Python chain
// rho / (sqrt(sumsq) + eps) (a reciprocal, then a product), so every backend
// gets the same bits. On the GPU the _rn intrinsics keep nvcc from contracting
// the add and the product into an FMA (it would, for a * b + c, by default);
// the CPU build compiles with -ffp-contract=off (setup.py) for the same reason.
// Acc is float for fp32 sums of squares and double for fp64 ones (where the
// torch backend computes the chain in fp64 too).

// Both passes of nvcc see the same host-device functions; only the device
// pass (__CUDA_ARCH__) takes the intrinsics. Plain IEEE sqrt, +, *, / are
// correctly rounded on the host, where nothing is fused (-ffp-contract=off).
#if defined(__CUDA_ARCH__)
#define SAMF_RN(device_expr, host_expr) return device_expr
#else
#define SAMF_RN(device_expr, host_expr) return host_expr
#endif
SAMF_HD float rn_sqrt(float x) { SAMF_RN(__fsqrt_rn(x), std::sqrt(x)); }
SAMF_HD double rn_sqrt(double x) { SAMF_RN(__dsqrt_rn(x), std::sqrt(x)); }
SAMF_HD float rn_add(float a, float b) { SAMF_RN(__fadd_rn(a, b), a + b); }
SAMF_HD double rn_add(double a, double b) { SAMF_RN(__dadd_rn(a, b), a + b); }
SAMF_HD float rn_mul(float a, float b) { SAMF_RN(__fmul_rn(a, b), a * b); }
SAMF_HD double rn_mul(double a, double b) { SAMF_RN(__dmul_rn(a, b), a * b); }
SAMF_HD float rn_div(float a, float b) { SAMF_RN(__fdiv_rn(a, b), a / b); }
SAMF_HD double rn_div(double a, double b) { SAMF_RN(__ddiv_rn(a, b), a / b); }
SAMF_HD float rn_rcp(float x) { SAMF_RN(__frcp_rn(x), 1.0f / x); }
SAMF_HD double rn_rcp(double x) { SAMF_RN(__drcp_rn(x), 1.0 / x); }
SAMF_HD bool is_finite(float x) { SAMF_RN(isfinite(x), std::isfinite(x)); }
SAMF_HD bool is_finite(double x) { SAMF_RN(isfinite(x), std::isfinite(x)); }
#undef SAMF_RN

// rho / (norm + eps) (normalize: SAM, ASAM, SAMPa) or rho (USAM), norm being
// sqrt(sumsq). With gradients scaled by S (grad_scale != nullptr) it is the
// scale of the unscaled ones: rho / (norm + S * eps), or (1 / S) * rho. 0 where
// sumsq is not finite: perturbation() below reads 0 as a skipped step (e == 0
// exactly). rho and eps arrive already rounded to Acc, as torch rounds a Python
// scalar to the tensor's dtype.
template <typename Acc>
SAMF_HD Acc scale_from_norm(Acc norm, bool sumsq_finite, Acc rho, Acc eps, bool normalize,
                            const Acc* grad_scale) {
  Acc scale = rho;
  if (normalize) {
    const Acc eps_term = grad_scale != nullptr ? rn_mul(*grad_scale, eps) : eps;
    scale = rn_mul(rn_rcp(rn_add(norm, eps_term)), rho);
  } else if (grad_scale != nullptr) {
    scale = rn_mul(rn_rcp(*grad_scale), rho);
  }
  return sumsq_finite ? scale : Acc(0);
}

// The same from sumsq with a correctly rounded sqrt: torch.sqrt on CUDA. (On
// the CPU torch.sqrt is not correctly rounded, so the CPU kernels take the
// norm from ATen's sqrt and call scale_from_norm: see cpu/ops_cpu.cpp.)
template <typename Acc>
SAMF_HD Acc perturbation_scale(Acc sumsq, Acc rho, Acc eps, bool normalize,
                               const Acc* grad_scale) {
  return scale_from_norm(normalize ? rn_sqrt(sumsq) : Acc(0), is_finite(sumsq), rho, eps,
                         normalize, grad_scale);
}

// The perturbation e of SAM / USAM (scale * g) or ASAM (scale * (|w| + eta)^2 * g);
// exactly 0 where scale == 0 (a skipped step: 0 * inf would be NaN).
SAMF_HD float perturbation(float w, float g, float scale, bool adaptive, bool has_eta, float eta) {
  if (scale == 0.0f) return 0.0f;
  if (!adaptive) return g * scale;
  float t = std::fabs(w);
  if (has_eta) t = t + eta;
  return ((t * t) * g) * scale;
}

// w + e, e rounded before the add as in the torch backend (e is a tensor of
// its own there): rn_add keeps nvcc from fusing the product in e into an FMA.
SAMF_HD float perturbed(float w, float g, float scale, bool adaptive, bool has_eta, float eta) {
  return rn_add(w, perturbation(w, g, scale, adaptive, has_eta, eta));
}

// The direction d of torch.optim.SGD for one element; writes the new momentum
// buffer to *new_buf (meaningful when momentum is on; buf is ignored with
// init_buffers). Select form, like adam_update below, so CPU loops vectorize.
SAMF_HD float sgd_direction(const SgdCoeffs& c, float x, float g, float buf, float* new_buf) {
  float d = g * c.grad_sign;
  const float d_decayed = d + c.weight_decay * x;
  d = c.has_weight_decay ? d_decayed : d;
  const float with_history = buf * c.momentum + c.one_minus_damp * d;
  const float b = c.init_buffers ? d : with_history;
  *new_buf = b;
  const float nesterov = d + c.momentum * b;
  const float d_momentum = c.nesterov ? nesterov : b;
  return c.has_momentum ? d_momentum : d;
}

// One Adam/AdamW element update. x: the weight (restored), g: the unscaled
// gradient. m, v (and vmax with kAmsgrad) are read and replaced by their new
// values; returns the new weight. host_counters selects torch_ops' host-step
// formula (addcdiv with a per-tensor step size) or its device-step formula.
// Multiplying by 1 or -1 is exact, so maximize and decoupled decay are
// factors (AdamCoeffs::grad_sign, x_factor) instead of branches.
template <bool kAmsgrad>
SAMF_HD float adam_update(const AdamCoeffs& c, const AdamStepScalars& s, bool host_counters,
                          float x, float g, float* m, float* v, float* vmax) {
  g = g * c.grad_sign;
  const float g_decayed = g + c.weight_decay * x;
  g = c.coupled_decay ? g_decayed : g;
  x = x * c.x_factor;
  const float new_m = lerp(*m, g, c.lerp_weight);
  const float new_v = addcmul(*v * c.beta2, c.one_minus_beta2, g, g);
  float second = new_v;
  if constexpr (kAmsgrad) {
    second = nan_max(*vmax, new_v);
    *vmax = second;
  }
  const float denom = std::sqrt(second) / s.bc2_sqrt + c.eps;
  *m = new_m;
  *v = new_v;
  const float host_x = addcdiv(x, s.step_size, new_m, denom);
  const float device_x = x + (new_m / denom) * s.step_size;
  return host_counters ? host_x : device_x;
}

// Bias corrections from a device step counter, in fp32 as torch_ops computes
// them on tensors: pow(beta, s), sqrt(1 - bc2), reciprocal(1 - bc1) * -lr.
SAMF_HD AdamStepScalars adam_device_step_scalars(const AdamCoeffs& c, float step) {
  AdamStepScalars s;
  const float bc1 = std::pow(c.beta1, step);
  const float bc2 = std::pow(c.beta2, step);
  s.bc2_sqrt = std::sqrt(1.0f - bc2);
  s.step_size = (1.0f / (1.0f - bc1)) * c.neg_lr;
  return s;
}

}  // namespace sam_fast
