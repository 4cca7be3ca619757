"""The combiner's problem in compact form: one unknown per *cell* of the active groups' Venn diagram.

Writing c_k = p_g(k) + sum_{m active, k in S_m} p_m(k) and d_m for specialist m's dustbin, the
objective is, up to a constant,

    L(q) = - sum_k c_k log q_k - sum_m d_m log q(not S_m).

Its optimality conditions give q_k = c_k / (1 + |A| - sum_{m: k not in S_m} lambda_m): the factor
q_k / c_k depends on k only through *which* active groups hold k. So the classes of an example
fall into cells (one per distinct set of active groups, plus the rest: classes in no active group,
where c = p_g and the optimum keeps the generalist's shape), and the problem is exactly the same
problem over cell masses Q with weights C = sum of c over the cell. An example with one active
specialist has two cells (its group and the rest) however large K is; the paper's 15,000 classes
cost the solver nothing extra.

Everything is flat over the batch: atoms (the classes of the union of an example's active groups),
cells, (example, specialist) pairs, and complements (cell, pair) for every cell outside the
pair's group, so "q outside S_m" is a sum over a list and never ``1 - q(S_m)``, which would cancel
catastrophically when S_m holds nearly all the mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from combine.inputs import CombineInputs, normalise_specialist
from specdistill.errors import SpecdistillError


@dataclass
class CompactProblem:
    rows: torch.Tensor        # [E] batch row of each example (the rows with >= 1 active specialist)
    atom_ex: torch.Tensor     # [Nu] example of each atom (a class in the union of active groups)
    atom_class: torch.Tensor  # [Nu] its class id
    atom_cell: torch.Tensor   # [Nu] its cell
    atom_flat: torch.Tensor   # [Nu] its position in the batch's [B, K] (row * K + class)
    log_c_atom: torch.Tensor  # [Nu] float64 log c of the atom
    log_gen_rest_raw: torch.Tensor  # [E] log p_g(classes in no active group), from the input rows
    cell_ex: torch.Tensor     # [Nc] example of each cell; the last E cells are the rest cells
    log_C: torch.Tensor       # [Nc] float64 log of the cell's total c
    log_G: torch.Tensor       # [Nc] float64 log of the cell's generalist mass (the solvers' start)
    log_n1: torch.Tensor      # [E] float64 log(1 + the active specialists' total weight: their number unless weighted)
    pair_ex: torch.Tensor     # [P] example of each (example, specialist) pair
    pair_spec: torch.Tensor   # [P] specialist of each pair
    log_dust: torch.Tensor    # [P] float64 log p_m(dustbin)
    comp_cell: torch.Tensor   # [C] complements: a cell ...
    comp_pair: torch.Tensor   # [C] ... outside this pair's group, of the same example

    @property
    def num_examples(self) -> int:
        return int(self.rows.numel())

    @property
    def num_cells(self) -> int:
        return int(self.cell_ex.numel())

    @property
    def num_pairs(self) -> int:
        return int(self.pair_ex.numel())


def segment_logsumexp(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """log(sum(exp(values))) per segment id, stable; an empty segment gives -inf."""
    top = values.new_full((num_segments,), -torch.inf)
    top.scatter_reduce_(0, segments, values, "amax", include_self=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = values.new_zeros(num_segments).index_add_(0, segments, torch.exp(values - top.index_select(0, segments)))
    return torch.log(total) + top


_EXP_SAFE = 600.0     # float64: exp(600) * 1e40 terms stays finite
_SUM_TINY = 1e-290    # float64: a sum above this lost nothing that matters to subnormal terms


def segment_logsumexp_bounded(values: torch.Tensor, segments: torch.Tensor, num_segments: int,
                              upper: float) -> torch.Tensor:
    """:func:`segment_logsumexp` of float64 ``values`` known to be <= ``upper`` (log-probabilities:
    ~0), without the per-segment maximum: one exp and one sum. Segments whose sum underflows
    (every value below ~-667) are redone with the stable version, so nothing turns into log 0."""
    if upper > _EXP_SAFE or values.dtype != torch.float64:
        return segment_logsumexp(values, segments, num_segments)
    total = values.new_zeros(num_segments).index_add_(0, segments, torch.exp(values))
    small = total < _SUM_TINY
    out = torch.log(total)
    if bool(small.any()):
        out = torch.where(small, segment_logsumexp(values, segments, num_segments), out)
    return out


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """Where each run of ``counts`` starts in the flat layout (the exclusive cumulative sum)."""
    return torch.cumsum(counts, 0) - counts


def segment_max(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    out = values.new_full((num_segments,), -torch.inf)
    return out.scatter_reduce_(0, segments, values, "amax", include_self=True)


def unique_inverse(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique rows/values and the inverse index; numpy on CPU, where torch's is ~5x slower."""
    if keys.device.type != "cpu":
        return torch.unique(keys, sorted=True, return_inverse=True, dim=0 if keys.dim() == 2 else None)
    uniq, inverse = np.unique(keys.numpy(), return_inverse=True, axis=0 if keys.dim() == 2 else None)
    return torch.from_numpy(uniq), torch.from_numpy(inverse.reshape(-1))


def build_problem(inputs: CombineInputs, active: torch.Tensor,
                  row_max: torch.Tensor | None = None) -> CompactProblem:
    """Flatten the active (example, specialist) pairs of a batch into a :class:`CompactProblem`.

    ``row_max`` ([B], optional) is each row's largest log-probability, if the caller has it.
    """
    gen = inputs.gen_log_probs
    device, K = gen.device, inputs.num_classes
    rows = active.any(dim=1).nonzero().squeeze(1)
    E = rows.numel()
    act = active[rows]
    pair_ex, pair_spec = act.nonzero(as_tuple=True)                # sorted by example, then specialist
    num_active = torch.bincount(pair_ex, minlength=E)
    # the specialists' total weight per example (1 each unless weighted): the EM step's 1 + |A|
    total_weight = num_active.double() if inputs.weights is None else \
        torch.zeros(E, dtype=torch.float64, device=device).index_add_(0, pair_ex, inputs.weights[pair_spec])

    layout = _Layout.of(inputs.groups, act, pair_ex, pair_spec, num_active, K)
    mem_logp, log_dust = _specialist_values(inputs, rows, pair_ex, layout.pair_order, layout.spec_bounds)

    # the generalist on the atoms, and summed over everything else (not 1 - p_g(U): no cancellation)
    whole = E == gen.shape[0]
    if row_max is None:
        row_max = gen.amax(dim=1) if whole else gen[rows].amax(dim=1)
    elif not whole:
        row_max = row_max[rows]
    log_rest_raw, gen_u = _scan_generalist(gen, None if whole else rows, layout.atom_ex, layout.atom_class,
                                           row_max)
    gen_u = gen_u.double()
    top = float(row_max.max()) if E else 0.0
    log_z = torch.logaddexp(log_rest_raw, segment_logsumexp_bounded(gen_u, layout.atom_ex, E, top))
    log_gen_u = gen_u - log_z.index_select(0, layout.atom_ex)
    # c <= 1 + the total weight, p_m's masses <= the largest weight (1 unweighted): exp cannot overflow
    w_max = 1.0 if inputs.weights is None or not len(inputs.weights) else max(float(inputs.weights.max()), 1e-300)
    c_max = float(total_weight.max()) + 1.0 if E else 1.0
    log_spec = segment_logsumexp_bounded(mem_logp, layout.mem_atom, layout.num_atoms, math.log(w_max))
    log_c_atom = torch.logaddexp(log_gen_u, log_spec)

    Ncu = layout.num_cells
    log_C = torch.cat([segment_logsumexp_bounded(log_c_atom, layout.atom_cell, Ncu, math.log(c_max)),
                       log_rest_raw - log_z])
    log_G = torch.cat([segment_logsumexp_bounded(log_gen_u, layout.atom_cell, Ncu, 0.0), log_rest_raw - log_z])
    cell_ex = torch.cat([layout.cell_ex, torch.arange(E, device=device)])
    comp_cell, comp_pair = _complements(layout.cell_ex, layout.cell_bits, num_active, pair_ex, E, Ncu)
    return CompactProblem(
        rows=rows, atom_ex=layout.atom_ex, atom_class=layout.atom_class, atom_cell=layout.atom_cell,
        atom_flat=(layout.atom_ex if whole else rows[layout.atom_ex]) * K + layout.atom_class,
        log_c_atom=log_c_atom, log_gen_rest_raw=log_rest_raw, cell_ex=cell_ex, log_C=log_C, log_G=log_G,
        log_n1=torch.log1p(total_weight), pair_ex=pair_ex, pair_spec=pair_spec,
        log_dust=log_dust, comp_cell=comp_cell, comp_pair=comp_pair,
    )


def _scan_generalist(x: torch.Tensor, rows: torch.Tensor | None, atom_ex: torch.Tensor, atom_class: torch.Tensor,
                     row_max: torch.Tensor, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the problem's rows of ``x`` (``rows``; None for all), in cache-sized blocks:
    (float64 log sum of exp(x[row, k]) over the classes k outside each row's atoms, x at the atoms).

    The atoms are sorted by example (:class:`_Layout`), so each block's are one slice: they are read
    while the block is in cache and zeroed in its exp, with no [E, K] mask. One exp in x's dtype,
    into a reused buffer (shifted by the row max unless every row's max is near 0, as
    log-probabilities' are); rows whose sum is too small to trust in that dtype (everything outside
    ~90+ nats below the maximum in float32) are redone in float64 with a proper log-sum-exp, so a
    generalist's tail mass never underflows to log 0.
    """
    E, K = row_max.numel(), x.shape[1]
    out = torch.empty(E, dtype=torch.float64, device=x.device)
    values = torch.empty(atom_ex.numel(), dtype=x.dtype, device=x.device)
    shift = not E or not bool((row_max.abs() <= 20).all())   # unshifted exp cannot overflow here
    bounds = torch.searchsorted(atom_ex, torch.arange(0, E + block, block, device=x.device).clamp(max=E)).tolist()
    local = (atom_ex % block) * K + atom_class                 # each atom's place in its block
    rows_buf = torch.empty(min(block, E), K, dtype=x.dtype, device=x.device) if rows is not None else None
    exp_buf = torch.empty(min(block, E), K, dtype=x.dtype, device=x.device)
    for i, start in enumerate(range(0, E, block)):
        stop = min(E, start + block)
        if rows is None:
            xb = x[start:stop]
        else:
            xb = torch.index_select(x, 0, rows[start:stop], out=rows_buf[:stop - start])
        lo, hi = bounds[i], bounds[i + 1]
        at = local[lo:hi]
        e = exp_buf[:stop - start]
        if shift:
            torch.sub(xb, row_max[start:stop, None], out=e)
            e.exp_()
        else:
            torch.exp(xb, out=e)
        torch.index_select(xb.view(-1), 0, at, out=values[lo:hi])   # the block is in cache now
        e.view(-1).index_fill_(0, at, 0)
        out[start:stop] = e.sum(dim=1)
    base = row_max.double() if shift else torch.zeros_like(out)
    out = torch.log(out) + base
    tiny = torch.finfo(x.dtype).tiny * 2 ** 30
    redo = (torch.exp(out - row_max.double()) < tiny).nonzero().squeeze(1)
    if redo.numel():   # rare: rows whose rest is ~90+ nats below their maximum, redone exactly
        position = torch.full((E,), -1, dtype=torch.int64, device=x.device)
        position[redo] = torch.arange(redo.numel(), device=x.device)
        hit = position[atom_ex] >= 0
        mask = torch.zeros(redo.numel(), K, dtype=torch.bool, device=x.device)
        mask[position[atom_ex[hit]], atom_class[hit]] = True
        xr = (x[redo] if rows is None else x[rows[redo]]).double()
        out[redo] = xr.masked_fill(mask, -torch.inf).logsumexp(dim=1)
    return out, values


@dataclass
class _Layout:
    """Where every atom, cell and membership of a batch lies, built once per distinct set of active
    specialists and repeated for each example with that set.

    The atoms and cells of an example depend only on *which* specialists are active for it, and with
    the top-n rule few sets occur (120 per 1,000 examples in bench_combine.py, K = 15,000, top-1): the
    union of the groups and its cells are found by sorting the sets' classes, not every example's.
    Atoms and cells come sorted by example. Memberships (a pair's group classes) come specialist by
    specialist, as :func:`_specialist_values` reads them: the pairs of specialist m in ``pair_order``
    ``[spec_bounds[m]:spec_bounds[m + 1]]`` (by example), each its ``|S_m|`` classes in group order.
    """

    atom_ex: torch.Tensor     # [Nu] example of each atom, sorted
    atom_class: torch.Tensor  # [Nu]
    atom_cell: torch.Tensor   # [Nu] its (union) cell
    cell_ex: torch.Tensor     # [Ncu] example of each union cell, sorted
    cell_bits: torch.Tensor   # [Ncu, W] which of the example's active pairs hold the cell
    mem_atom: torch.Tensor    # [L] the atom of each membership (pair, class of its group)
    pair_order: torch.Tensor  # [P] the pairs, specialist by specialist
    spec_bounds: list         # [M + 1] each specialist's slice of pair_order

    @property
    def num_atoms(self) -> int:
        return int(self.atom_ex.numel())

    @property
    def num_cells(self) -> int:
        return int(self.cell_ex.numel())

    @classmethod
    def of(cls, groups, act: torch.Tensor, pair_ex: torch.Tensor, pair_spec: torch.Tensor, num_active: torch.Tensor,
           K: int) -> _Layout:
        device = act.device
        E, M = act.shape
        sizes = torch.tensor([g.numel() for g in groups], device=device, dtype=torch.int64)
        set_of_ex, rep = _distinct_sets(act)
        t = _set_templates(groups, sizes, act[rep], K)
        U = rep.numel()
        ar = torch.arange(E, device=device)

        def expand(counts_per_set, offsets_per_set):
            """For each example, its set's run of template items: (example of each item, template item)."""
            n = counts_per_set[set_of_ex]
            total = int(n.sum())
            ex = torch.repeat_interleave(ar, n, output_size=total)
            start = _starts(n)
            first = torch.repeat_interleave(offsets_per_set[set_of_ex] - start, n, output_size=total)
            return ex, first.add_(torch.arange(total, device=device)), start, n

        n_atoms = torch.bincount(t["atom_set"], minlength=U)
        n_cells = torch.bincount(t["cell_set"], minlength=U)
        atom_off, cell_off = _starts(n_atoms), _starts(n_cells)
        atom_ex, t_atom, ex_atom_start, ex_atoms = expand(n_atoms, atom_off)
        cell_ex, t_cell, ex_cell_start, _ = expand(n_cells, cell_off)
        # 1-D gathers through index_select: faster on CPU than indexing with a tensor
        atom_cell = torch.repeat_interleave(ex_cell_start - cell_off[set_of_ex], ex_atoms, output_size=t_atom.numel())
        atom_cell += t["atom_cell"].index_select(0, t_atom)

        # memberships, specialist by specialist: pair (e, m) is its set's template pair number
        # (e's rank of m among its active specialists), whose memberships map to template atoms
        pair_local = torch.arange(pair_ex.numel(), device=device) - _starts(num_active)[pair_ex]
        order = torch.argsort(pair_spec, stable=True)
        bounds = torch.searchsorted(pair_spec[order], torch.arange(M + 1, device=device)).tolist()
        ex_o = pair_ex[order]
        size_o = sizes[pair_spec[order]]
        L = int(size_o.sum())
        template_pair = t["pair_first"][set_of_ex[ex_o]] + pair_local[order]
        t_mem = torch.repeat_interleave(t["pair_mem_start"][template_pair] - _starts(size_o), size_o, output_size=L)
        t_mem += torch.arange(L, device=device)
        mem_atom = torch.repeat_interleave((ex_atom_start - atom_off[set_of_ex])[ex_o], size_o, output_size=L)
        mem_atom += t["mem_atom"].index_select(0, t_mem)
        return cls(atom_ex, t["atom_class"].index_select(0, t_atom), atom_cell, cell_ex,
                   t["cell_bits"].index_select(0, t_cell), mem_atom, order, bounds)


def _distinct_sets(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the set of each row of the [E, M] mask, one row holding each distinct set)."""
    E, M = act.shape
    words = max(1, -(-M // _BITS))
    spec = torch.arange(M, device=act.device)
    keys = torch.zeros(E, words, dtype=torch.int64, device=act.device).index_add_(
        1, spec // _BITS, act.long() << (spec % _BITS))
    uniq, set_of_ex = unique_inverse(keys if words > 1 else keys[:, 0])
    rep = torch.empty(uniq.shape[0], dtype=torch.int64, device=act.device)
    rep[set_of_ex] = torch.arange(E, device=act.device)     # any row of the set will do
    return set_of_ex, rep


def _set_templates(groups, sizes: torch.Tensor, t_act: torch.Tensor, K: int) -> dict:
    """Atoms, cells and memberships of each distinct set (the rows of ``t_act``), sorted by set."""
    device = t_act.device
    U = t_act.shape[0]
    pair_set, pair_spec = t_act.nonzero(as_tuple=True)
    P = pair_set.numel()
    num_active = torch.bincount(pair_set, minlength=U)
    pair_local = torch.arange(P, device=device) - _starts(num_active)[pair_set]
    group_start = _starts(sizes)
    pair_size = sizes[pair_spec]
    L = int(pair_size.sum())
    mem_pair = torch.repeat_interleave(torch.arange(P, device=device), pair_size, output_size=L)
    local = torch.arange(L, device=device) - _starts(pair_size)[mem_pair]
    mem_class = torch.cat(list(groups))[group_start[pair_spec][mem_pair] + local]
    mem_set = pair_set[mem_pair]
    uniq, mem_atom = unique_inverse(mem_set * K + mem_class)
    uniq, mem_atom = uniq.to(device), mem_atom.to(device)
    atom_set = uniq // K
    atom_cell, cell_set, cell_bits = _cells(mem_atom, pair_local[mem_pair], atom_set, uniq.numel(), U,
                                            int(num_active.max()) if U else 0)
    return {"atom_set": atom_set, "atom_class": uniq % K, "atom_cell": atom_cell, "cell_set": cell_set,
            "cell_bits": cell_bits, "mem_atom": mem_atom, "pair_first": _starts(num_active),
            "pair_mem_start": _starts(pair_size)}


def _specialist_values(inputs: CombineInputs, rows, pair_ex, pair_order, spec_bounds):
    """(log p_m(class) of every membership, log p_m(dustbin) of every pair), float64.

    The memberships come specialist by specialist (:class:`_Layout`): specialist m's outputs are
    read only for the rows where it is active, and joined by one concatenation.
    """
    inside, dust = [], []
    for m, spec in enumerate(inputs.spec_log_probs):
        sel = pair_order[spec_bounds[m]:spec_bounds[m + 1]]
        if sel.numel() == 0:
            continue
        lp = normalise_specialist(spec.index_select(0, rows.index_select(0, pair_ex.index_select(0, sel))),
                                  inputs.covers_all[m])
        if inputs.weights is not None:   # w_m KL(p_m || q_m): p_m's masses count w_m times
            lp = lp + torch.log(inputs.weights[m])
        inside.append(lp[:, :-1].reshape(-1))
        dust.append(lp[:, -1])
    device = pair_ex.device
    mem_logp = torch.cat(inside) if inside else torch.zeros(0, dtype=torch.float64, device=device)
    log_dust = torch.empty(pair_ex.numel(), device=device, dtype=torch.float64)
    log_dust[pair_order] = torch.cat(dust) if dust else log_dust[:0]
    if not inputs.values_checked and (bool(torch.isnan(mem_logp).any()) or bool(torch.isnan(log_dust).any())):
        # NaN and +inf both give NaN after normalising; name the first specialist that has one
        for m, spec in enumerate(inputs.spec_log_probs):
            sel = pair_order[spec_bounds[m]:spec_bounds[m + 1]]
            if bool(torch.isnan(normalise_specialist(spec[rows[pair_ex[sel]]], inputs.covers_all[m])).any()):
                raise SpecdistillError(f"spec_log_probs[{m}] contains NaN or +inf where the specialist is "
                                       "active; pass finite log-probabilities (log_softmax of the model's logits)")
    return mem_logp, log_dust


_BITS = 62  # group-membership bits per int64 word (kept below 63 so shifts stay positive)
_DENSE_CELL_TABLE = 1 << 22


def _cells(mem_atom, mem_local, atom_ex, Nu: int, E: int, max_active: int):
    """Group atoms by (example, set of active groups holding them).

    The set is a bit mask over the example's active pairs (bit j = its j-th active specialist),
    several int64 words when an example has more than 62 active specialists. Returns the cell of
    each atom, and each cell's example and mask words [Nc, W].
    """
    device = atom_ex.device
    words = max(1, -(-max_active // _BITS))
    # each (atom, pair) membership is unique, so adding the bits is the same as or-ing them
    flat = atom_ex.new_zeros(Nu * words).index_add_(
        0, mem_atom * words + mem_local // _BITS, torch.ones_like(mem_local) << (mem_local % _BITS))
    bits = flat.view(Nu, words)
    ex_bits = max(1, int(E).bit_length())
    if words == 1 and E << max_active <= _DENSE_CELL_TABLE:
        # few active specialists: a dense (example, mask) table numbers the cells without sorting
        keys = (atom_ex << max_active) | bits[:, 0]
        present = torch.zeros(E << max_active, dtype=torch.bool, device=device)
        present[keys] = True
        uniq = present.nonzero().squeeze(1)
        number = torch.empty(E << max_active, dtype=torch.int64, device=device)
        number[uniq] = torch.arange(uniq.numel(), device=device)
        atom_cell = number[keys]
        cell_ex, cell_bits = uniq >> max_active, (uniq & ((1 << max_active) - 1))[:, None]
    elif words == 1 and max_active + ex_bits <= 62:
        keys = (atom_ex << max_active) | bits[:, 0]
        uniq, atom_cell = unique_inverse(keys)
        uniq, atom_cell = uniq.to(device), atom_cell.to(device)
        cell_ex, cell_bits = uniq >> max_active, (uniq & ((1 << max_active) - 1))[:, None]
    else:
        uniq, atom_cell = unique_inverse(torch.cat([atom_ex[:, None], bits], dim=1))
        uniq, atom_cell = uniq.to(device), atom_cell.to(device)
        cell_ex, cell_bits = uniq[:, 0], uniq[:, 1:]
    return atom_cell, cell_ex, cell_bits


def _complements(cell_ex_u, cell_bits, num_active, pair_ex, E: int, Ncu: int):
    """(cell, pair) for every cell of a pair's example that lies outside the pair's group.

    The rest cell of an example is outside every group; a union cell is outside the pairs whose
    bit is clear. Candidates are (cell, j) for j below the example's number of active pairs.
    """
    device = cell_ex_u.device
    first_pair = _starts(num_active)
    n = num_active[cell_ex_u]
    total = int(n.sum())
    cand_cell = torch.repeat_interleave(torch.arange(Ncu, device=device), n, output_size=total)
    j = torch.arange(total, device=device) - _starts(n)[cand_cell]
    bit = (cell_bits[cand_cell, j // _BITS] >> (j % _BITS)) & 1
    keep = bit == 0
    cand_pair = first_pair[cell_ex_u[cand_cell]] + j
    P = pair_ex.numel()
    comp_cell = torch.cat([cand_cell[keep], Ncu + pair_ex])
    comp_pair = torch.cat([cand_pair[keep], torch.arange(P, device=device)])
    return comp_cell, comp_pair
