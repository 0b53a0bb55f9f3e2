// Per-element math of BSAM's three ops (sam_fast/bsam_ops.py: bsam_noise_,
// bsam_ascent_, bsam_update_), shared by the CPU kernels (cpu/ops_cpu.cpp)
// and the CUDA kernels (cuda/ops_cuda.cu).
//
// The executable specification is sam_fast/backends/torch_bsam.py: the
// functions here evaluate its expressions in its order, in the math dtype Acc
// (float for fp32, fp16 and bf16 storage; double for fp64 storage; see
// family.h's math_t), every product and quotient rounded on its own (rn_mul,
// rn_div: nvcc would otherwise fuse a product and the add after it into an
// FMA; the CPU build has -ffp-contract=off).
//
// The square roots (the noise's sigma, the curvature term's sqrt(s)) are the
// one thing left to the callers: the specification takes torch.sqrt, which is
// correctly rounded on CUDA (so the CUDA kernels take rn_sqrt) but not on the
// CPU, where ATen calls a vector math library (MKL on x86: within an ulp,
// machine-dependent). The CPU kernels therefore take the roots from ATen's
// own sqrt over the call's arguments (cpu/ops_cpu.cpp), which gives the
// specification's bits on any machine; everything else is here.
//
// Plain scalars and raw values only, no ATen/c10 API.
#pragma once

#include "elementwise.h"
#include "family.h"

namespace sam_fast {

// The scalars of bsam_ascent_, rounded once to Acc on the host as torch rounds
// a Python float to the tensor's dtype, except inv_scale, which the kernels
// derive from the device's grad scale: 1 / S correctly rounded
// (torch.reciprocal), or exactly 1 without a scale (then g * 1 == g exactly).
template <typename Acc>
struct BsamAscentCoeffs {
  Acc rho;
  Acc inv_scale;
};

// The scalars of bsam_update_. one_minus_beta1, one_minus_beta2 and
// damping_plus_wd are computed in double first, as Python computes them.
template <typename Acc>
struct BsamUpdateCoeffs {
  Acc lr;
  Acc beta1;
  Acc one_minus_beta1;
  Acc beta2;
  Acc one_minus_beta2;
  Acc weight_decay;
  Acc damping_plus_wd;
  Acc inv_scale;
  bool new_s;  // w is stepped with the new s (the paper), else the previous one
};

// bsam_noise_: the argument of sigma's square root, 1 / (s * N).
template <typename Acc>
SAMF_HD Acc bsam_noise_variance(Acc s, Acc num_data) {
  return rn_rcp(rn_mul(s, num_data));
}

// bsam_noise_: the noisy point w + z * sigma (z the fp32 draw, widened to Acc).
template <typename Acc>
SAMF_HD Acc bsam_noisy(Acc w, Acc z, Acc sigma) {
  return w + rn_mul(z, sigma);
}

// bsam_ascent_: u = g * (1/S); w = backup + (u * rho) / s; gs = sqrt(s) |u|.
template <typename Acc>
SAMF_HD void bsam_ascent_values(const BsamAscentCoeffs<Acc>& c, Acc backup, Acc g, Acc s,
                                Acc sqrt_s, Acc* w, Acc* gs) {
  const Acc u = rn_mul(g, c.inv_scale);
  *w = backup + rn_div(rn_mul(u, c.rho), s);
  *gs = rn_mul(sqrt_s, std::fabs(u));  // fabs: |-0| is +0, as torch.abs
}

// bsam_update_ from w0 = backup: u = g * (1/S); d = u + w0 wd;
// m' = b1 m + (1 - b1) d; s' = b2 s + (1 - b2)(gs + (damping + wd));
// w = w0 - (m' / (s' or s)) lr. Writes w, m' and s' (before rounding to storage).
template <typename Acc>
SAMF_HD void bsam_update_values(const BsamUpdateCoeffs<Acc>& c, Acc w0, Acc g, Acc m, Acc s,
                                Acc gs, Acc* w, Acc* new_m, Acc* new_s) {
  const Acc u = rn_mul(g, c.inv_scale);
  const Acc d = u + rn_mul(w0, c.weight_decay);
  const Acc next_m = rn_mul(m, c.beta1) + rn_mul(d, c.one_minus_beta1);
  const Acc next_s = rn_mul(s, c.beta2) + rn_mul(gs + c.damping_plus_wd, c.one_minus_beta2);
  const Acc step = rn_div(next_m, c.new_s ? next_s : s);
  *w = w0 - rn_mul(step, c.lr);
  *new_m = next_m;
  *new_s = next_s;
}

}  // namespace sam_fast
