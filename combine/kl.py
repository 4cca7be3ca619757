"""The public combiner: ``kl_combine`` (generalist + active specialists -> one distribution) and the
objective it minimises, ``kl_objective``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from combine.activation import membership_matrix, top_classes
from combine.inputs import check_active, check_inputs, check_row_max, normalise_specialist
from combine.problem import build_problem
from combine.solvers import solve_fixed_point, solve_gradient, write_log_q
from specdistill.errors import SpecdistillError
from specdistill.threads import torch_threads

SOLVERS = ("fixed_point", "em", "gradient")


def kl_combine(gen_log_probs: torch.Tensor, groups: Sequence, spec_log_probs: Sequence,
               top_n: int = 1, solver: str = "fixed_point", max_iter: int = 200, tol: float = 1e-9,
               active: torch.Tensor | None = None, chunk_size: int = 4096,
               return_info: bool = False, out: torch.Tensor | None = None, weights=None):
    """Combine a generalist with its specialists, per example (Hinton et al. 2015, section 5.4).

    For each example: take the generalist's ``top_n`` most probable classes; every specialist whose
    group contains one of them is *active*; return the distribution q over all K classes that
    minimises

        KL(p_g || q) + sum over active m of w_m KL(p_m || q_m),

    where q_m is q on specialist m's classes plus, in its dustbin, all of q outside them, and the
    weights w_m are 1 (the paper's eq. 5) unless given.
    Inactive specialists contribute nothing; an example with no active specialist gets q = p_g
    exactly (the same values, not a recomputation).

    Serving the ensemble yourself: run the generalist, run a specialist only on the examples where
    it is active (``combine.active_specialists`` gives the [B, M] mask before any specialist runs),
    put its log-probabilities in its row of a [B, |S_m|+1] tensor (other rows are never read or
    checked), and call this. Everything is batched (no loop over examples) on the device of
    ``gen_log_probs``; on CPU it runs on one thread, the fastest for its many small operations.

    Args:
        gen_log_probs: [B, K] generalist log-probabilities (log_softmax of the logits).
        groups: M integer tensors, specialist m's class ids in the order of its outputs.
        spec_log_probs: M tensors [B, |S_m| + 1]: specialist m's log-probabilities over its classes
            then the dustbin (last), *after* the dustbin correction (the log of the oversampling
            factor added to the dustbin logit, then log_softmax). Rows are renormalised here.
            A group holding every class has an empty dustbin: its dustbin probability is dropped.
        top_n: how many of the generalist's top classes activate specialists (paper: 1).
        solver: "fixed_point" (the default: EM accelerated by SQUAREM, exact and fastest, see
            BENCHMARKS.md), "em" (plain EM: monotone, but slow when dustbins hold much mass) or
            "gradient" (the paper's gradient descent on the logits z of q = softmax z).
        max_iter, tol: stop when every example's largest |change of log q| per iteration <= tol
            (a "fixed_point" iteration is three EM steps).
        active: optional [B, M] bool mask to use instead of the top-n rule.
        chunk_size: examples per solve, bounding memory on large batches.
        return_info: also return {"active": [B, M] mask, "iterations": [B] per-example counts}.
        out: a [B, K] tensor (dtype and device of ``gen_log_probs``) to write log q into. A server that
            reuses one per batch saves the first touch of a fresh [B, K] array, which at K = 15,000 cost
            more than the pass that fills it (BENCHMARKS.md).
        weights: optional M non-negative weights, one per specialist (the generalist's is 1): how much
            say each specialist has beside the generalist (``combine.weighting``, fitted on held-out
            data); 0 silences a specialist, 2 counts it twice.

    Returns:
        log q, [B, K], dtype and device of ``gen_log_probs``; log space throughout, so classes whose
        probability underflows get very negative log-probabilities, never NaN.

    Raises:
        SpecdistillError: mismatched group / output sizes, class ids out of range, NaN inputs.
    """
    device = gen_log_probs.device if isinstance(gen_log_probs, torch.Tensor) else torch.device("cpu")
    # one CPU thread: the combiner is hundreds of small gathers and scatters, which intra-op threads
    # do not speed up, and on a busy machine every parallel region waits for a time slice
    # (measured: 40x slower with 2 threads on a loaded 2-core box). Use processes for more cores.
    with torch.no_grad(), torch_threads(1 if device.type == "cpu" else None):
        return _kl_combine(gen_log_probs, groups, spec_log_probs, top_n, solver, max_iter, tol, active,
                           chunk_size, return_info, out, weights)


def _kl_combine(gen_log_probs, groups, spec_log_probs, top_n, solver, max_iter, tol, active, chunk_size,
                return_info, out, weights):
    inputs = check_inputs(gen_log_probs, groups, spec_log_probs, check_values=False, weights=weights)
    gen = inputs.gen_log_probs
    B, K = gen.shape
    if solver not in SOLVERS:
        raise SpecdistillError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if not isinstance(top_n, int) or top_n < 1:
        raise SpecdistillError(f"top_n={top_n!r}; it must be a whole number >= 1 (the paper uses 1)")
    if max_iter < 0 or not tol >= 0:
        raise SpecdistillError(f"max_iter={max_iter}, tol={tol}; both must be >= 0")
    if chunk_size < 1:
        raise SpecdistillError(f"chunk_size={chunk_size}; it must be >= 1")
    M = len(inputs.groups)
    if active is None:
        values, index = top_classes(gen, top_n)
        row_max = values[:, 0]
        active = membership_matrix(inputs.groups, K, gen.device)[index].any(dim=1) if M else \
            torch.zeros(B, 0, dtype=torch.bool, device=gen.device)
    else:
        active = check_active(active, B, M, gen.device)
        row_max = gen.amax(dim=1) if B else gen.new_zeros(0)
    check_row_max(row_max)
    if out is None:
        out = torch.empty_like(gen)
    elif out.shape != gen.shape or out.dtype != gen.dtype or out.device != gen.device or not out.is_contiguous():
        raise SpecdistillError(f"out is {tuple(out.shape)} {out.dtype} on {out.device}; it must be a contiguous "
                               f"tensor like gen_log_probs ({tuple(gen.shape)} {gen.dtype} on {gen.device})")
    iterations = torch.zeros(B, dtype=torch.int64, device=gen.device)
    for start in range(0, B, chunk_size):
        stop = min(B, start + chunk_size)
        if not bool(active[start:stop].any()):
            out[start:stop] = gen[start:stop]   # no active specialist: q = p_g exactly
            continue
        problem = build_problem(_slice(inputs, start, stop), active[start:stop], row_max[start:stop])
        rows = problem.rows + start
        if solver in ("fixed_point", "em"):
            lQ, info = solve_fixed_point(problem, max_iter, tol, accelerate=solver == "fixed_point")
            write_log_q(problem, lQ, gen[start:stop], out[start:stop])
        else:
            out[start:stop] = gen[start:stop]
            lq, info = solve_gradient(problem, gen[rows], max_iter, tol)
            out[rows] = lq.to(gen.dtype)
        iterations[rows] = info["iterations"].to(gen.device)
    if return_info:
        return out, {"active": active, "iterations": iterations}
    return out


def _slice(inputs, start: int, stop: int):
    if start == 0 and stop == inputs.gen_log_probs.shape[0]:
        return inputs
    return type(inputs)(inputs.gen_log_probs[start:stop], inputs.groups,
                        [s[start:stop] for s in inputs.spec_log_probs], inputs.covers_all, inputs.values_checked,
                        inputs.weights)


def kl_objective(log_q: torch.Tensor, gen_log_probs: torch.Tensor, groups: Sequence,
                 spec_log_probs: Sequence, active: torch.Tensor, weights=None) -> torch.Tensor:
    """KL(p_g || q) + sum over active m of w_m KL(p_m || q_m), per example ([B], float64).

    Straight from the definition (q_m built by summing q outside the group), so tests and benchmarks
    can judge any solver by it. A group holding every class has its dustbin dropped, as in
    :func:`kl_combine`. Differentiable in ``log_q``.
    """
    inputs = check_inputs(gen_log_probs, groups, spec_log_probs, weights=weights)
    lq = log_q.double()
    lg = torch.log_softmax(inputs.gen_log_probs.double(), dim=1)
    total = _kl(lg, lq)
    active = check_active(active, lq.shape[0], len(inputs.groups), lq.device)
    for m, (group, spec) in enumerate(zip(inputs.groups, inputs.spec_log_probs)):
        rows = active[:, m].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        outside = torch.ones(lq.shape[1], dtype=torch.bool, device=lq.device)
        outside[group] = False
        lq_rows = lq[rows]
        lq_m = torch.cat([lq_rows[:, group], lq_rows[:, outside].logsumexp(dim=1, keepdim=True)], dim=1)
        w = 1.0 if inputs.weights is None else float(inputs.weights[m])
        total = total.index_add(0, rows, w * _kl(normalise_specialist(spec[rows], inputs.covers_all[m]), lq_m))
    return total


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; terms with p = 0 are 0."""
    terms = torch.exp(lp) * (lp - lq)
    return torch.where(lp > -torch.inf, terms, torch.zeros_like(terms)).sum(dim=1)
