// The op schemas defined by the compiled library (docs/design.md section 3), shared by
// the version-matched module (ops.cpp) and the portable one (stable_module.cpp).
//
// Schemas mark every list an op writes with (x!) so functionalization (and so
// torch.compile) and opcheck know what is mutated. Optional lists are passed as
// empty lists: mutable optional lists are not something every PyTorch version can
// functionalize. perturb_ and sampa_points_ take the global sum of squares and derive
// the scale rho / (sqrt(sumsq) + eps) inside the kernel (elementwise.h). The SAM
// family's generic ops and BSAM's are defined in Python (sam_fast/family_ops.py,
// sam_fast/bsam_ops.py), so that they exist without this library.
#pragma once

namespace sam_fast {

constexpr const char* kSchemas[] = {
    "grad_sumsq(Tensor[] grads, Tensor[] params, float eta) -> Tensor",
    "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sumsq, *, "
    "float rho, float eps, bool normalize, float? eta, Tensor? grad_scale) -> ()",
    "restore_(Tensor(a!)[] params, Tensor[] backups) -> ()",
    "restore_sgd_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
    "Tensor(b!)[] momentum_buffers, *, float lr, float momentum, float dampening, "
    "float weight_decay, bool nesterov, bool maximize, bool init_buffers, "
    "Tensor? grad_scale, Tensor? found_inf) -> ()",
    "restore_adamw_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
    "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
    "Tensor(e!)[] state_steps, *, float lr, float beta1, float beta2, float eps, "
    "float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
    "Tensor? grad_scale, Tensor? found_inf) -> ()",
    "sampa_points_(Tensor(a!)[] params, Tensor[] grads_y, Tensor[] momentum_buffers, "
    "Tensor(b!)[] backups, Tensor(c!)[] ys, Tensor sumsq, *, float rho, float eps, "
    "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
    "bool maximize, bool init_buffers) -> ()",
    "sampa_update_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads_tilde, "
    "Tensor[] grads_y, Tensor(b!)[] momentum_buffers, *, float lam, float lr, "
    "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
    "bool init_buffers) -> ()",
};

}  // namespace sam_fast
