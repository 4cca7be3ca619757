"""Per-example solvers written straight from the definition, to check and time the batched ones.

* :func:`reference_solve`: a high-precision reference. scipy's trust-region Newton
  (``trust-exact``) on the logits z (q = softmax z, z_0 fixed at 0 to remove the shift freedom)
  in float64, stopping at gradient norm 1e-13. The gradient is torch autograd of
  :func:`objective_z`, the definition itself, so the point it converges to shares nothing with the
  EM derivation: agreement is evidence, not an echo. (The Hessian, which only sets the speed of
  convergence, is the closed form n1 (diag q - q q^T) - sum_m d_m (diag r_m - r_m r_m^T), r_m being
  q restricted to the classes outside S_m and renormalised.)
* :func:`paper_gradient_descent`: what the paper describes (section 5.4): for each image, gradient
  descent on z with q = softmax(z), through autograd (the benchmark runs the same loop inline to
  time each accuracy it passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from combine.inputs import normalise_specialist


def objective_z(z: torch.Tensor, gen_log_probs: torch.Tensor,
                specialists: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The combiner's objective for one example as a function of logits z [K].

    ``specialists``: (outside mask [K] bool, normalised log-probs [|S|+1]) of the active ones;
    the group's classes are the mask's False entries, in increasing class order.
    """
    lq = torch.log_softmax(z, dim=0)
    lg = gen_log_probs
    total = (torch.exp(lg) * (lg - lq)).sum()
    for outside, lp in specialists:
        lq_m = torch.cat([lq[~outside], lq[outside].logsumexp(0, keepdim=True)])
        terms = torch.exp(lp) * (lp - lq_m)
        total = total + torch.where(lp > -torch.inf, terms, torch.zeros_like(terms)).sum()
    return total


def example_specialists(groups: Sequence[torch.Tensor], spec_rows: Sequence[torch.Tensor],
                        num_classes: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(outside mask, normalised log-probs in increasing class order) for one example's specialists."""
    out = []
    for group, row in zip(groups, spec_rows):
        group = torch.as_tensor(group, dtype=torch.int64)
        lp = normalise_specialist(torch.as_tensor(row)[None], group.numel() == num_classes)[0]
        order = torch.argsort(group)
        outside = torch.ones(num_classes, dtype=torch.bool)
        outside[group] = False
        out.append((outside, torch.cat([lp[:-1][order], lp[-1:]]).to(dtype)))
    return out


def reference_solve(gen_log_probs: torch.Tensor, groups: Sequence[torch.Tensor],
                    spec_rows: Sequence[torch.Tensor], gtol: float = 1e-13,
                    max_iter: int = 2000) -> torch.Tensor:
    """High-precision log q [K] (float64) for one example and its *active* specialists."""
    lg = torch.log_softmax(torch.as_tensor(gen_log_probs, dtype=torch.float64), dim=0)
    K = lg.numel()
    specs = example_specialists(groups, spec_rows, K)
    if not specs:
        return lg.clone()

    def full(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.new_zeros(1), x])

    def f(x: torch.Tensor) -> torch.Tensor:
        return objective_z(full(x), lg, specs)

    def fun(x: np.ndarray):
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = f(xt)
        (grad,) = torch.autograd.grad(value, xt)
        return float(value.detach()), grad.numpy()

    dust = np.array([float(torch.exp(lp[-1])) for _, lp in specs])
    outs = [outside.numpy() for outside, _ in specs]

    def hess(x: np.ndarray) -> np.ndarray:
        q = torch.softmax(full(torch.tensor(x, dtype=torch.float64)), dim=0).numpy()
        h = (1 + len(specs)) * (np.diag(q) - np.outer(q, q))
        for d, outside in zip(dust, outs):
            r = np.where(outside, q, 0.0)
            if r.sum() > 0:
                r = r / r.sum()
                h -= d * (np.diag(r) - np.outer(r, r))
        return h[1:, 1:]

    x0 = (lg[1:] - lg[0]).numpy()
    result = minimize(fun, x0, jac=True, hess=hess, method="trust-exact",
                      options={"gtol": gtol, "maxiter": max_iter})
    return torch.log_softmax(full(torch.tensor(result.x)), dim=0)


def paper_gradient_descent(gen_log_probs: torch.Tensor, groups: Sequence[torch.Tensor],
                           spec_rows: Sequence[torch.Tensor], lr: float = 1.0, max_iter: int = 1000,
                           target: float | None = None, rel_tol: float = 1e-6,
                           dtype=torch.float64) -> tuple[torch.Tensor, int]:
    """The paper's per-image gradient descent on z, with autograd; returns (log q [K], iterations).

    The step is ``lr / (1 + number of active specialists)`` (the objective's curvature is at most
    1 + |A|). With ``target`` (the optimum's value) it stops as soon as the objective is within
    ``rel_tol`` of it: an oracle stopping rule that flatters this baseline in the benchmark.
    """
    lg = torch.log_softmax(torch.as_tensor(gen_log_probs, dtype=dtype), dim=0)
    specs = example_specialists(groups, spec_rows, lg.numel(), dtype)
    z = lg.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr / (1 + len(specs)))
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        opt.zero_grad()
        value = objective_z(z, lg, specs)
        if target is not None and float(value.detach()) <= target + rel_tol * abs(target):
            iterations -= 1
            break
        value.backward()
        opt.step()
    return torch.log_softmax(z.detach(), dim=0), iterations
