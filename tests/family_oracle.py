"""Float64 oracles of the SAM family, written from the papers' equations.

Nothing here calls sam_fast: the gradients come from tests/oracle.py's float64 Problem,
the base optimizers are its textbook SGD64 / AdamW64. ``eps`` is SAM's 1e-12.
"""

from __future__ import annotations

import torch

from oracle import _norm


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _ascent(w, g, rho, eps=1e-12):
    scale = rho / (_norm(g) + eps)
    return [wi + scale * gi for wi, gi in zip(w, g)]


def interval_trajectory(problem, base, steps, rho, k):
    """SAM every k steps (Composer's interval): steps 0, k, 2k, ... are SAM steps
    (Foret et al. 2021, eq. 2-3), the others plain base steps on g = grad L_B(w)."""
    w, out = problem.initial(), []
    for t in range(steps):
        g = problem.grad(w, t)
        if t % k == 0:
            g = problem.grad(_ascent(w, g, rho), t)
        w = base.step(w, g)
        out.append(w)
    return out


def looksam_trajectory(problem, base, steps, rho, k, alpha):
    """LookSAM, Liu et al. CVPR 2022, Algorithm 1 (eq. 6-7): at t mod k = 0,
    g_s = grad at w + rho g/|g|, g_v = g_s - |g_s| cos(theta) g/|g| (cos = <g, g_s>/(|g||g_s|));
    otherwise g_s = g + alpha (|g| / |g_v|) g_v. The base step takes g_s."""
    w, out, gv = problem.initial(), [], None
    for t in range(steps):
        g = problem.grad(w, t)
        if t % k == 0:
            gs = problem.grad(_ascent(w, g, rho), t)
            cos = _dot(g, gs) / (_norm(g) * _norm(gs))
            gv = [a - _norm(gs) * cos * b / _norm(g) for a, b in zip(gs, g)]
        else:
            ratio = _norm(g) / _norm(gv)
            gs = [a + alpha * ratio * v for a, v in zip(g, gv)]
        w = base.step(w, gs)
        out.append(w)
    return out


def gsam_trajectory(problem, base, steps, alpha, rho_of):
    """GSAM, Zhuang et al. ICLR 2022, Algorithm 1: rho_t from the schedule (``rho_of(t)``),
    grad f_p = grad at w + rho_t g/|g|, g_perp = g - <g, u> u with u = grad f_p / |grad f_p|
    (eq. 8's decomposition), update direction grad f_p - alpha g_perp."""
    w, out = problem.initial(), []
    for t in range(steps):
        g = problem.grad(w, t)
        gp = problem.grad(_ascent(w, g, rho_of(t)), t)
        u = [x / _norm(gp) for x in gp]
        proj = _dot(g, u)
        g_perp = [a - proj * b for a, b in zip(g, u)]
        w = base.step(w, [a - alpha * b for a, b in zip(gp, g_perp)])
        out.append(w)
    return out


def wsam_trajectory(problem, base, steps, rho, gamma, decouple, lrs):
    """WSAM, Yue et al. KDD 2023: L_WSAM = L + gamma/(1-gamma) (L(w + e) - L(w)) (eq. 4);
    coupled: one base step with its gradient (1-2 gamma)/(1-gamma) g + gamma/(1-gamma) g_adv;
    decoupled (Algorithm 1): the base step with g, then w -= lr gamma/(1-gamma) (g_adv - g)."""
    a = gamma / (1 - gamma)
    w, out = problem.initial(), []
    for t in range(steps):
        g = problem.grad(w, t)
        ga = problem.grad(_ascent(w, g, rho), t)
        if decouple:
            w = base.step(w, g)
            w = [wi - lrs[t] * a * (x - y) for wi, x, y in zip(w, ga, g)]
        else:
            w = base.step(w, [(1 - 2 * gamma) / (1 - gamma) * y + a * x for x, y in zip(ga, g)])
        out.append(w)
    return out


def fsam_trajectory(problem, base, steps, rho, sigma, lmbda, official=False):
    """Friendly-SAM, Li et al. CVPR 2024, Algorithm 1: m_t = lmbda m_{t-1} + (1-lmbda) g_t,
    d_t = g_t - sigma m_t, e = rho d_t/|d_t|, m_{-1} = 0; the base step takes the gradient
    at w + e. ``official``: the authors' code, d_t = g_t - sigma m_{t-1}, m_0 = d_0 = g_0."""
    w, out, m = problem.initial(), [], None
    for t in range(steps):
        g = problem.grad(w, t)
        if official:
            if m is None:
                d, m = g, [x.clone() for x in g]
            else:
                d = [x - sigma * y for x, y in zip(g, m)]
                m = [lmbda * y + (1 - lmbda) * x for x, y in zip(g, m)]
        else:
            m = [(1 - lmbda) * x if m is None else lmbda * y + (1 - lmbda) * x
                 for x, y in zip(g, m or g)]
            d = [x - sigma * y for x, y in zip(g, m)]
        ga = problem.grad(_ascent(w, d, rho), t)
        w = base.step(w, ga)
        out.append(w)
    return out


def msam_trajectory(problem, base, steps, rho, direction):
    """Momentum-SAM, Becker et al. 2024: w~_t = w_t - rho v_t / |v_t| with v_t the base's
    momentum before step t (``direction(base)``: SGD64's buffer, AdamW64's first moment; None
    before the first step, when w~_0 = w_0), the gradient at w~_t, the base step from w_t.
    Written from the update the authors' optimizer/msam.py performs (its first loop moves
    back by rho v_t/|v_t|, steps, and its second moves to the next w~): the same sequence of
    unperturbed weights, with its weight decay read at w_t here (see docs/family.md)."""
    w, out = problem.initial(), []
    for t in range(steps):
        v = direction(base)
        point = w if v is None else _ascent(w, v, -rho)
        w = base.step(w, problem.grad(point, t))
        out.append(w)
    return out


# -- ESAM and BSAM ---------------------------------------------------------------------------


def _losses(problem, w, k, idx=None, grad=False):
    """Per-example cross-entropy losses of batch ``k`` (its examples ``idx``) at ``w``, and
    with ``grad`` the gradient of their mean (the model's batch statistics are those of the
    examples passed, as in a forward pass over them)."""
    from torch.func import functional_call

    x, y = problem.batches[k]
    if idx is not None:
        x, y = x[idx], y[idx]
    leaves = [t.detach().clone().requires_grad_(grad) for t in w]
    with torch.set_grad_enabled(grad):
        out = functional_call(problem.model, dict(zip(problem.names, leaves)), (x,))
        losses = torch.nn.functional.cross_entropy(out, y, reduction="none")
    if not grad:
        return losses.detach(), None
    return losses.detach(), [g.detach() for g in torch.autograd.grad(losses.mean(), leaves)]


def esam_trajectory(problem, base, steps, rho, beta, gamma, seed, swp="element", eps=1e-12):
    """ESAM, Du et al. ICLR 2022 (Section 3 and Algorithm 1).

    SWP (Section 3.1): a mask ``m`` with Bernoulli(beta) entries, ``e = (rho / beta) m * g /
    |g|``, ``g = grad L_B(w)``: ``swp="element"`` one entry per coordinate and ``|g|`` the
    whole gradient's norm (the paper's mask over the weights); ``swp="tensor"`` one entry per
    parameter tensor and ``|g|`` over the chosen tensors (the authors' utils/Esam.py, where
    the others have no gradient). SDS (Section 3.2, the set B+ of its selection equation):
    B+ the ``floor(gamma n)`` examples with the largest ``l(w + e) - l(w)``, and the update
    is the base step with ``grad L_{B+}(w + e)``, the mean over B+ (the model run on B+).

    The random numbers are drawn as sam_fast.ESAM draws them (one CPU generator seeded with
    ``seed``; per step an fp32 ``bernoulli_(beta)`` over all coordinates in parameter order,
    or one fp64 ``rand`` per tensor compared with beta), so that the masks are the same."""
    gen = torch.Generator().manual_seed(seed)
    w, out = problem.initial(), []
    for t in range(steps):
        before, g = _losses(problem, w, t, grad=True)
        if beta < 1.0:
            if swp == "element":
                flat = torch.empty(sum(x.numel() for x in w), dtype=torch.float32)
                flat = flat.bernoulli_(beta, generator=gen).double()
                masks = list(torch.split(flat, [x.numel() for x in w]))
                masks = [mi.view(x.shape) for mi, x in zip(masks, w)]
                norm = _norm(g)
            else:
                keep = torch.rand(len(w), generator=gen, dtype=torch.float64) < beta
                masks = [torch.full_like(x, float(k)) for x, k in zip(w, keep.tolist())]
                norm = _norm([mi * gi for mi, gi in zip(masks, g)])
            point = [wi + (rho / beta) * mi * gi / (norm + eps) for wi, mi, gi in zip(w, masks, g)]
        else:
            point = _ascent(w, g, rho, eps)
        if gamma < 1.0:
            after, _ = _losses(problem, point, t)
            n = after.shape[0]
            k = max(1, int(gamma * n + 1e-9))
            idx = torch.sort(torch.topk(after - before, k).indices).values
            _, ga = _losses(problem, point, t, idx, grad=True)
        else:
            _, ga = _losses(problem, point, t, grad=True)
        w = base.step(w, ga)
        out.append(w)
    return out


def bsam_trajectory(problem, steps, lr, beta1, beta2, weight_decay, rho, damping, num_data,
                    seed, s_init=1.0, official=False):
    """bSAM, Moellenhoff & Khan ICLR 2023, Algorithm 1 (lines as we number them):
    1. eps ~ N(0, sigma^2), sigma^2 = 1 / (N s);  2. g1 = grad L_B(w + eps);
    3. e = rho g1 / s;  4. g = grad L_B(w + e);  5. m <- beta1 m + (1 - beta1)(g + delta w);
    6. s <- beta2 s + (1 - beta2)(sqrt(s) |g1| + delta + gamma);  7. w <- w - alpha m / s,
    with m = 0 and s = s_init at the start. ``official``: the authors' code
    (team-approx-bayes/bayesian-sam, optim.py's build_bsam_optimizer, one sub-batch) takes
    line 7 with the previous s, before line 6.

    The standard normal draws are sam_fast.BSAM's (one CPU generator seeded with ``seed``;
    per step one fp32 normal_ over all coordinates in parameter order)."""
    gen = torch.Generator().manual_seed(seed)
    w = problem.initial()
    m = [torch.zeros_like(x) for x in w]
    s = [torch.full_like(x, s_init) for x in w]
    out = []
    for t in range(steps):
        z = torch.empty(sum(x.numel() for x in w), dtype=torch.float32).normal_(generator=gen)
        z = [zi.view(x.shape).double() for zi, x in zip(torch.split(z, [x.numel() for x in w]), w)]
        noisy = [wi + zi * torch.sqrt(1.0 / (num_data * si)) for wi, zi, si in zip(w, z, s)]
        g1 = problem.grad(noisy, t)
        g = problem.grad([wi + rho * gi / si for wi, gi, si in zip(w, g1, s)], t)
        m = [beta1 * mi + (1 - beta1) * (gi + weight_decay * wi) for mi, gi, wi in zip(m, g, w)]
        s_new = [beta2 * si + (1 - beta2) * (torch.sqrt(si) * gi.abs() + weight_decay + damping)
                 for si, gi in zip(s, g1)]
        w = [wi - lr * mi / (so if official else sn) for wi, mi, so, sn in zip(w, m, s, s_new)]
        s = s_new
        out.append(w)
    return out
