"""Solvers for min_q KL(p_g || q) + sum_{m active} KL(p_m || q_m) on a :class:`CompactProblem`.

**Fixed point (EM).** With c_k and d_m as in :mod:`combine.problem`, the objective is the negative
log-likelihood of a multinomial q observed partly exactly (weights c_k on class k) and partly only
as "somewhere outside S_m" (weight d_m): maximum likelihood with aggregated observations. EM
spreads each dustbin over the classes outside its group in proportion to the current q (E-step)
and renormalises the expected counts, whose total is 1 + |A| (M-step):

    q_k <- [ c_k + q_k * sum_{m active, k not in S_m} d_m / q(not S_m) ] / (1 + |A|).

EM never increases the objective and the objective is convex in q (a sum of -log of linear
functions), so the iteration converges to the global minimum. The same expression is the KKT
condition q_k = c_k / (1 + |A| - sum_{m: k not in S_m} lambda_m) with lambda_m = d_m / q(not S_m),
and the gradient of the objective in the paper's logits z (q = softmax z) is
(1 + |A|) (q - EM(q)): an EM step is a gradient step in z with the per-class step 1/((1 + |A|) q_k),
which is why it needs far fewer iterations. Everything runs in log space, so probabilities below
1e-308 do not turn into 0/0.

EM's rate is linear and slow where dustbins hold most of the mass (thousands of steps on peaked
random inputs), so the default ``fixed_point`` solver wraps it in SQUAREM, a monotone extrapolation
of two EM steps (:func:`squarem_step`). Both work on the cells of :mod:`combine.problem` (EM on the
cell masses is EM on the classes with q kept proportional to c inside each cell, as at the optimum).

**Gradient descent on z** is the paper's method (section 5.4), batched over examples here over all
K logits; the per-example version is the benchmark's baseline (``benchmarks/bench_combine.py``).
Its step is bounded by the largest curvature (1 + |A|) while a class whose probability must shrink
has curvature ~q_k, so the objective gap of those classes falls only like 1/t: on realistic
outputs 2,000 iterations still leave 1e-3 to 1e-2 relative gap (BENCHMARKS.md), where EM + SQUAREM
is exact to 1e-8 in a few iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from combine.problem import CompactProblem, segment_logsumexp, segment_max

# log q(not S_m) below this is treated as this: only reachable when the caller gives -inf
# log-probabilities to every class outside a group, and keeps the arithmetic free of inf - inf.
_LOG_FLOOR = -1e300


def _lambdas(lQ, log_dust, comp_cell, comp_pair, num_pairs):
    """log lambda_m = log d_m - log q(not S_m), the E-step's weight of each dustbin."""
    log_out = segment_logsumexp(lQ[comp_cell], comp_pair, num_pairs).clamp_min(_LOG_FLOOR)
    return torch.where(log_dust > -torch.inf, log_dust - log_out, torch.full_like(log_dust, -torch.inf))


def em_step(lQ: torch.Tensor, log_C: torch.Tensor, log_n1_cell: torch.Tensor, log_dust: torch.Tensor,
            comp_cell: torch.Tensor, comp_pair: torch.Tensor) -> torch.Tensor:
    """One EM update of the cells' log Q (float64), for any subset of examples."""
    log_lam = _lambdas(lQ, log_dust, comp_cell, comp_pair, log_dust.numel())
    log_s = segment_logsumexp(log_lam[comp_pair], comp_cell, lQ.numel())
    return torch.logaddexp(log_C, lQ + log_s) - log_n1_cell


def _change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    delta = (new - old).abs()
    return torch.where(torch.isnan(delta), torch.zeros_like(delta), delta)  # -inf - -inf: no change


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    both = torch.isfinite(a) & torch.isfinite(b)
    return torch.where(both, a - b, torch.zeros_like(a))


@dataclass
class _WorkingSet:
    """The examples still iterating: their cells, pairs and complements, renumbered densely."""

    ex_ids: torch.Tensor       # [E'] example ids in the problem
    cell_ids: torch.Tensor     # [N'] cell ids in the problem
    cell_ex: torch.Tensor
    log_C: torch.Tensor
    log_n1_cell: torch.Tensor
    pair_ex: torch.Tensor
    log_dust: torch.Tensor
    comp_cell: torch.Tensor
    comp_pair: torch.Tensor

    @classmethod
    def of(cls, p: CompactProblem) -> _WorkingSet:
        device = p.log_C.device
        return cls(torch.arange(p.num_examples, device=device), torch.arange(p.num_cells, device=device),
                   p.cell_ex, p.log_C, p.log_n1[p.cell_ex], p.pair_ex, p.log_dust, p.comp_cell, p.comp_pair)

    @property
    def num_examples(self) -> int:
        return int(self.ex_ids.numel())

    def em(self, lQ: torch.Tensor) -> torch.Tensor:
        return em_step(lQ, self.log_C, self.log_n1_cell, self.log_dust, self.comp_cell, self.comp_pair)

    def objective(self, lQ: torch.Tensor) -> torch.Tensor:
        """Per example: -sum_c C_c log Q_c - sum_m d_m log Q(not S_m) for normalised Q (+ const)."""
        E = self.num_examples
        log_z = segment_logsumexp(lQ, self.cell_ex, E)
        log_out = segment_logsumexp(lQ[self.comp_cell], self.comp_pair, self.log_dust.numel())
        C, d = torch.exp(self.log_C), torch.exp(self.log_dust)
        cells = torch.where(C > 0, C * (lQ - log_z[self.cell_ex]), torch.zeros_like(C))
        dust = torch.where(d > 0, d * (log_out - log_z[self.pair_ex]), torch.zeros_like(d))
        return -(lQ.new_zeros(E).index_add_(0, self.cell_ex, cells).index_add_(0, self.pair_ex, dust))

    def subset(self, keep: torch.Tensor) -> _WorkingSet:
        cell_keep, pair_keep = keep[self.cell_ex], keep[self.pair_ex]
        ex_map = torch.cumsum(keep, 0) - 1
        cell_map = torch.cumsum(cell_keep, 0) - 1
        pair_map = torch.cumsum(pair_keep, 0) - 1
        comp_keep = pair_keep[self.comp_pair]
        return _WorkingSet(
            self.ex_ids[keep], self.cell_ids[cell_keep], ex_map[self.cell_ex[cell_keep]],
            self.log_C[cell_keep], self.log_n1_cell[cell_keep], ex_map[self.pair_ex[pair_keep]],
            self.log_dust[pair_keep], cell_map[self.comp_cell[comp_keep]], pair_map[self.comp_pair[comp_keep]])


def squarem_step(work: _WorkingSet, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SQUAREM iteration (Varadhan & Roland 2008, scheme S3) on log Q, per example.

    Two EM steps give r = x1 - x0 and v = x2 - 2 x1 + x0; the extrapolation
    x0 - 2 a r + a^2 v with a = -|r| / |v| (at most -1, where a = -1 gives x2) is mapped through one
    more EM step, and kept only if its objective is no worse than x2's, which EM already made no
    worse than x0's: the iteration stays monotone. Returns (new log Q, its objective).
    """
    x1 = work.em(x0)
    x2 = work.em(x1)
    r = _diff(x1, x0)
    v = _diff(x2, x1) - r
    E, cell_ex = work.num_examples, work.cell_ex
    rr = x0.new_zeros(E).index_add_(0, cell_ex, r * r)
    vv = x0.new_zeros(E).index_add_(0, cell_ex, v * v)
    alpha = torch.where(vv > 0, -torch.sqrt(rr / vv.clamp_min(1e-300)), torch.full_like(vv, -1.0)).clamp(max=-1.0)
    a = alpha[cell_ex]
    xp = x0 - 2 * a * r + a * a * v
    x3 = work.em(torch.where(torch.isnan(xp), x2, xp))
    f2, f3 = work.objective(x2), work.objective(x3)
    take = f3 <= f2
    return torch.where(take[cell_ex], x3, x2), torch.where(take, f3, f2)


def solve_fixed_point(problem: CompactProblem, max_iter: int = 200, tol: float = 1e-9,
                      accelerate: bool = True) -> tuple[torch.Tensor, dict]:
    """EM from the generalist's cell masses until every example's largest |change of log Q| <= tol.

    ``accelerate`` (the default) wraps EM in SQUAREM: on examples whose dustbins hold much of the
    mass EM's linear rate is slow (thousands of steps to 1e-9), which SQUAREM cuts to tens; one
    iteration is then three EM steps. Converged examples leave the working set (compacted once
    half of it has converged), so the few slow examples of a batch do not make every example pay
    for their iterations. Returns the cells' normalised log Q (float64) and
    ``{"iterations": per-example counts}``.
    """
    E = problem.num_examples
    lQ_full = problem.log_G.clone()
    iterations = torch.zeros(E, dtype=torch.int64, device=lQ_full.device)
    work = _WorkingSet.of(problem)
    lQ = lQ_full.clone()
    for _ in range(max_iter):
        new = squarem_step(work, lQ)[0] if accelerate else work.em(lQ)
        done = segment_max(_change(new, lQ), work.cell_ex, work.num_examples) <= tol
        lQ = new
        iterations[work.ex_ids] += 1
        if bool(done.all()):
            break
        if 2 * int(done.sum()) >= work.num_examples:
            lQ_full[work.cell_ids] = lQ  # converged values are final
            lQ = lQ[(~done)[work.cell_ex]]
            work = work.subset(~done)
    lQ_full[work.cell_ids] = lQ
    lQ_full = lQ_full - segment_logsumexp(lQ_full, problem.cell_ex, E)[problem.cell_ex]
    return lQ_full, {"iterations": iterations}


def atoms_log_q(problem: CompactProblem, lQ: torch.Tensor) -> torch.Tensor:
    """log q of every atom from its cell's mass: q stays proportional to c inside a cell."""
    cell = problem.atom_cell
    return problem.log_c_atom + (lQ - problem.log_C).index_select(0, cell)


def write_log_q(problem: CompactProblem, lQ: torch.Tensor, gen: torch.Tensor, out: torch.Tensor,
                block: int = 16) -> None:
    """Write the solution over all K classes into ``out`` ([B, K] like ``gen``, the batch's rows):
    classes in no active group keep p_g's shape (shifted by the rest cell's change), the atoms get
    :func:`atoms_log_q`. By blocks of rows, so each block's atoms are written while it is in cache
    (the atoms are sorted by example, hence by position)."""
    B, K = gen.shape
    shift = torch.zeros(B, dtype=gen.dtype, device=gen.device)
    shift[problem.rows] = rest_shift(problem, lQ).to(gen.dtype)
    values = atoms_log_q(problem, lQ).to(gen.dtype)
    flat = problem.atom_flat
    bounds = torch.searchsorted(flat, torch.arange(0, B + block, block, device=gen.device).clamp(max=B) * K).tolist()
    for i, start in enumerate(range(0, B, block)):
        stop = min(B, start + block)
        torch.add(gen[start:stop], shift[start:stop, None], out=out[start:stop])
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            out[start:stop].view(-1).index_copy_(0, flat[lo:hi] - start * K, values[lo:hi])


def rest_shift(problem: CompactProblem, lQ: torch.Tensor) -> torch.Tensor:
    """[E] what to add to the input log p_g of classes in no active group (same shape as p_g)."""
    E = problem.num_examples
    shift = lQ[-E:] - problem.log_gen_rest_raw if E else lQ[:0]
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def solve_gradient(problem: CompactProblem, gen_rows: torch.Tensor, max_iter: int = 200,
                   tol: float = 1e-9, step: float = 1.0, trace=None) -> tuple[torch.Tensor, dict]:
    """The paper's gradient descent on z (q = softmax z over all K classes), batched.

    ``gen_rows`` is [E, K] (the generalist on the problem's rows); z starts at log p_g and moves by
    ``step / (1 + |A|)`` times the gradient (the objective's curvature is at most 1 + |A|, so
    step 1 is stable). The gradient is (1 + |A|) q - c - q s, s_k being the sum of the lambdas of
    the active dustbins that k falls in. Stops when every example's largest |change of log q| is
    <= ``tol``. ``trace(iteration, log_q)``, if given, sees every iterate (the benchmark counts the
    iterations to a given accuracy with it). Returns dense [E, K] float64 log q.
    """
    E, K = gen_rows.shape
    ex_u, cls_u, cell_u = problem.atom_ex, problem.atom_class, problem.atom_cell
    Ncu = problem.num_cells - E
    z = torch.log_softmax(gen_rows.double(), dim=1)
    c = torch.exp(z)
    c[ex_u, cls_u] = torch.exp(problem.log_c_atom)
    in_union = torch.zeros(E, K, dtype=torch.bool, device=z.device)
    in_union[ex_u, cls_u] = True
    n1 = torch.exp(problem.log_n1)[:, None]
    lr = step / n1
    lq = z.clone()
    iterations = 0
    for _ in range(max_iter):
        # cell masses: sums over the cells' classes, and each example's rest (not 1 - q(U))
        lQ = torch.cat([segment_logsumexp(lq[ex_u, cls_u], cell_u, Ncu),
                        lq.masked_fill(in_union, -torch.inf).logsumexp(1)])
        log_lam = _lambdas(lQ, problem.log_dust, problem.comp_cell, problem.comp_pair, problem.num_pairs)
        s_cell = torch.exp(segment_logsumexp(log_lam[problem.comp_pair], problem.comp_cell,
                                             problem.num_cells))
        s = s_cell[Ncu:][:, None].expand(E, K).clone()     # outside U: every active dustbin
        s[ex_u, cls_u] = s_cell[cell_u]
        q = torch.exp(lq)
        z = z - lr * (n1 * q - c - q * s)
        new = torch.log_softmax(z, dim=1)
        delta = _change(new, lq).amax(dim=1)
        lq = new
        iterations += 1
        if trace is not None:
            trace(iterations, lq)
        if bool((delta <= tol).all()):
            break
    return lq, {"iterations": torch.full((E,), iterations, dtype=torch.int64)}
