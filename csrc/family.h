// Per-element math of the SAM family's generic ops (sam_fast/family_ops.py:
// dot_sumsq, combine_, ema_residual_), shared by the CPU kernels
// (cpu/ops_cpu.cpp) and the CUDA kernels (cuda/ops_cuda.cu).
//
// The executable specification is sam_fast/backends/torch_family.py: the
// functions here evaluate its expressions in its order, in the math dtype Acc
// (float for fp32, fp16 and bf16 storage; double for fp64 storage), every
// product rounded on its own (rn_mul: nvcc would otherwise fuse a product and
// the add after it into an FMA; the CPU build has -ffp-contract=off), so the
// elementwise outputs are the specification's bits on either device.
//
// Plain scalars and raw values only, no ATen/c10 API: the kernels' cores stay
// callable from wrappers of another ABI (PyTorch's stable ABI).
#pragma once

#include "elementwise.h"

namespace sam_fast {

// The math dtype of a storage dtype: double for double, float otherwise.
template <typename T>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};
template <typename T>
using math_t = typename MathOf<T>::type;

// combine_: coef0 * a + coef1 * b, both products rounded, then their sum
// (torch_family.combine_: _foreach_mul twice, then _foreach_add_).
template <typename Acc>
SAMF_HD Acc combine_value(Acc a, Acc b, Acc coef0, Acc coef1) {
  return rn_mul(a, coef0) + rn_mul(b, coef1);
}

// ema_residual_'s scalars, rounded once to Acc on the host as torch rounds a
// Python float to the tensor's opmath dtype (one_minus_decay is 1 - decay
// computed in double first, as Python computes it), except inv_scale, which
// the kernels derive from the device's grad scale: 1 / S correctly rounded
// (torch.reciprocal), or exactly 1 without a scale (then u == g exactly).
template <typename Acc>
struct EmaCoeffs {
  Acc decay;
  Acc one_minus_decay;
  Acc sigma;
  Acc inv_scale;
  bool updated;  // the residual takes the new average (else the previous one)
};

// One element of ema_residual_: u = g * (1/S); m' = decay m + (1 - decay) u;
// d = u - sigma (m' or m). Writes m' and d (before rounding to storage).
template <typename Acc>
SAMF_HD void ema_values(const EmaCoeffs<Acc>& c, Acc m, Acc g, Acc* new_m, Acc* d) {
  const Acc u = rn_mul(g, c.inv_scale);
  const Acc next = rn_mul(m, c.decay) + rn_mul(u, c.one_minus_decay);
  const Acc ref = c.updated ? next : m;
  *new_m = next;
  *d = u - rn_mul(ref, c.sigma);
}

}  // namespace sam_fast
