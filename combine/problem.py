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
    log_n1: torch.Tensor      # [E] float64 log(1 + number of active specialists)
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
    total = values.new_zeros(num_segments).index_add_(0, segments, torch.exp(values - top[segments]))
    return torch.log(total) + top


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
    pair_ex, pair_spec = active[rows].nonzero(as_tuple=True)       # sorted by example, then specialist
    P = pair_ex.numel()
    num_active = torch.bincount(pair_ex, minlength=E)
    pair_local = torch.arange(P, device=device) - (torch.cumsum(num_active, 0) - num_active)[pair_ex]

    mem_pair, mem_class, mem_logp, log_dust = _memberships(inputs, rows, pair_ex, pair_spec)
    atom_ex, atom_class, split, atom_cell, cell_ex_u, cell_bits = _atoms_and_cells(
        pair_ex, pair_local, num_active, mem_pair, mem_class, K, E)
    Ncu = cell_ex_u.numel()

    # the generalist on the atoms, and summed over everything else (not 1 - p_g(U): no cancellation)
    whole = E == gen.shape[0]
    # [B, K] positions of the atoms, flat (torch.take / index_copy_ are ~2x faster than 2-D indexing)
    atom_flat = (atom_ex if whole else rows[atom_ex]) * K + atom_class
    gen_u = torch.take(gen, atom_flat).double()
    if row_max is None:
        row_max = gen.amax(dim=1) if whole else gen[rows].amax(dim=1)
    elif not whole:
        row_max = row_max[rows]
    log_rest_raw = _rest_logsumexp(gen, None if whole else rows, atom_ex, atom_class, split[3], row_max)
    log_z = torch.logaddexp(log_rest_raw, segment_logsumexp(gen_u, atom_ex, E))
    log_gen_u = gen_u - log_z[atom_ex]
    log_c_atom = torch.logaddexp(log_gen_u, _sum_over_atoms(mem_logp, split))

    log_C = torch.cat([segment_logsumexp(log_c_atom, atom_cell, Ncu), log_rest_raw - log_z])
    log_G = torch.cat([segment_logsumexp(log_gen_u, atom_cell, Ncu), log_rest_raw - log_z])
    cell_ex = torch.cat([cell_ex_u, torch.arange(E, device=device)])

    comp_cell, comp_pair = _complements(cell_ex_u, cell_bits, num_active, pair_ex, E, Ncu)
    return CompactProblem(
        rows=rows, atom_ex=atom_ex, atom_class=atom_class, atom_cell=atom_cell, atom_flat=atom_flat,
        log_c_atom=log_c_atom,
        log_gen_rest_raw=log_rest_raw, cell_ex=cell_ex, log_C=log_C, log_G=log_G,
        log_n1=torch.log1p(num_active.double()), pair_ex=pair_ex, pair_spec=pair_spec,
        log_dust=log_dust, comp_cell=comp_cell, comp_pair=comp_pair,
    )


def _sum_over_atoms(mem_logp: torch.Tensor, split) -> torch.Tensor:
    """log of the active specialists' summed p_m(k) per atom; atoms of single-specialist examples
    (the first ``n_s``) are one membership each and need no reduction."""
    s_idx, m_idx, m_inv, n_s, n_m = split
    return torch.cat([mem_logp[s_idx], segment_logsumexp(mem_logp[m_idx], m_inv, n_m)])


def _rest_logsumexp(x: torch.Tensor, rows: torch.Tensor | None, atom_ex: torch.Tensor, atom_class: torch.Tensor,
                    n_first: int, row_max: torch.Tensor, block: int = 64) -> torch.Tensor:
    """float64 log sum of exp(x[row, k]) over the classes k outside each problem row's atoms, in
    cache-sized blocks of rows (``rows``: the problem's rows of ``x``, None for all).

    The atoms come as two runs, each sorted by example (:func:`_atoms_and_cells`: the atoms of
    single-specialist examples, then the others'), so a block finds its own by binary search and
    zeroes them in its exp: no [E, K] mask is built. One pass of exp in x's dtype (shifted by the
    row max unless every row's max is near 0, as log-probabilities' are); rows whose sum is too small
    to trust in that dtype (everything outside ~90+ nats below the maximum in float32) are redone in
    float64 with a proper log-sum-exp, so a generalist's tail mass never underflows to log 0.
    """
    E = row_max.numel()
    out = torch.empty(E, dtype=torch.float64, device=x.device)
    runs = [(atom_ex[:n_first], atom_class[:n_first]), (atom_ex[n_first:], atom_class[n_first:])]
    shift = not E or not bool((row_max.abs() <= 20).all())   # unshifted exp cannot overflow here
    for start in range(0, E, block):
        stop = min(E, start + block)
        xb = x[start:stop] if rows is None else x[rows[start:stop]]
        e = torch.exp(xb - row_max[start:stop, None]) if shift else torch.exp(xb)
        for ex, cls in runs:
            lo, hi = torch.searchsorted(ex, torch.tensor([start, stop], device=ex.device)).tolist()
            e[ex[lo:hi] - start, cls[lo:hi]] = 0
        out[start:stop] = e.sum(dim=1).double()
    base = row_max.double() if shift else torch.zeros_like(out)
    out = torch.log(out) + base
    tiny = torch.finfo(x.dtype).tiny * 2 ** 30
    redo = (torch.exp(out - row_max.double()) < tiny).nonzero().squeeze(1)
    if redo.numel():   # rare: rows whose rest is ~90+ nats below their maximum, redone exactly
        position = torch.full((E,), -1, dtype=torch.int64, device=x.device)
        position[redo] = torch.arange(redo.numel(), device=x.device)
        hit = position[atom_ex] >= 0
        mask = torch.zeros(redo.numel(), x.shape[1], dtype=torch.bool, device=x.device)
        mask[position[atom_ex[hit]], atom_class[hit]] = True
        xr = (x[redo] if rows is None else x[rows[redo]]).double()
        out[redo] = xr.masked_fill(mask, -torch.inf).logsumexp(dim=1)
    return out


def _atoms_and_cells(pair_ex, pair_local, num_active, mem_pair, mem_class, K: int, E: int):
    """Atoms (distinct (example, class) of the memberships) and their cells.

    Returns (atom_ex, atom_class, split, atom_cell, cell_ex, cell_bits), ``split`` saying which
    memberships map to which atoms (see :func:`_sum_over_atoms`).

    An example with one active specialist needs no sorting: its atoms are its group's classes and
    they form one cell. Only examples with several active specialists go through the unique().
    """
    device = pair_ex.device
    single_ex = num_active == 1
    mem_single = single_ex[pair_ex[mem_pair]]
    s_idx, m_idx = mem_single.nonzero().squeeze(1), (~mem_single).nonzero().squeeze(1)
    n_s = s_idx.numel()
    s_ex = pair_ex[mem_pair[s_idx]]
    single_rows = single_ex.nonzero().squeeze(1)
    cell_of_single = torch.full((E,), -1, dtype=torch.int64, device=device)
    cell_of_single[single_rows] = torch.arange(single_rows.numel(), device=device)

    uniq, inv = unique_inverse(pair_ex[mem_pair[m_idx]] * K + mem_class[m_idx])
    uniq, inv = uniq.to(device), inv.to(device)
    m_atom_ex = uniq // K
    m_cell, m_cell_ex, m_bits = _cells(inv, pair_local[mem_pair[m_idx]], m_atom_ex, uniq.numel(), E,
                                       int(num_active.max()) if num_active.numel() else 0)
    n_single_cells = single_rows.numel()
    words = m_bits.shape[1]
    single_bits = torch.zeros(n_single_cells, words, dtype=torch.int64, device=device)
    single_bits[:, 0] = 1
    atom_ex = torch.cat([s_ex, m_atom_ex])
    atom_class = torch.cat([mem_class[s_idx], uniq % K])
    atom_cell = torch.cat([cell_of_single[s_ex], n_single_cells + m_cell])
    cell_ex_u = torch.cat([single_rows, m_cell_ex])
    cell_bits = torch.cat([single_bits, m_bits])
    split = (s_idx, m_idx, inv, n_s, uniq.numel())
    return atom_ex, atom_class, split, atom_cell, cell_ex_u, cell_bits


def _memberships(inputs: CombineInputs, rows, pair_ex, pair_spec):
    """(pair, class, log p_m(class)) for every class of every active pair, and each pair's dustbin.

    Pair p owns positions mem_off[p] .. mem_off[p] + |S_m| - 1; the specialists' outputs are read
    only for the rows where they are active (a loop over specialists, not examples).
    """
    device = pair_ex.device
    sizes = torch.tensor([g.numel() for g in inputs.groups], device=device, dtype=torch.int64)
    flat_groups = torch.cat(inputs.groups)
    group_start = torch.cumsum(sizes, 0) - sizes
    pair_size = sizes[pair_spec]
    mem_off = torch.cumsum(pair_size, 0) - pair_size
    L = int(pair_size.sum())
    P = pair_ex.numel()
    mem_pair = torch.repeat_interleave(torch.arange(P, device=device), pair_size, output_size=L)
    local = torch.arange(L, device=device) - mem_off[mem_pair]
    mem_class = flat_groups[group_start[pair_spec][mem_pair] + local]
    mem_logp = torch.empty(L, device=device, dtype=torch.float64)
    log_dust = torch.empty(P, device=device, dtype=torch.float64)
    for m, (group, spec) in enumerate(zip(inputs.groups, inputs.spec_log_probs)):
        sel = (pair_spec == m).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        lp = normalise_specialist(spec[rows[pair_ex[sel]]], inputs.covers_all[m])
        if not inputs.values_checked and bool(torch.isnan(lp).any()):   # NaN and +inf both give NaN here
            raise SpecdistillError(f"spec_log_probs[{m}] contains NaN or +inf where the specialist is active; "
                                   "pass finite log-probabilities (log_softmax of the model's logits)")
        idx = mem_off[sel][:, None] + torch.arange(group.numel(), device=device)
        mem_logp[idx.reshape(-1)] = lp[:, :-1].reshape(-1)
        log_dust[sel] = lp[:, -1]
    return mem_pair, mem_class, mem_logp, log_dust


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
    first_pair = torch.cumsum(num_active, 0) - num_active
    n = num_active[cell_ex_u]
    total = int(n.sum())
    cand_cell = torch.repeat_interleave(torch.arange(Ncu, device=device), n, output_size=total)
    j = torch.arange(total, device=device) - (torch.cumsum(n, 0) - n)[cand_cell]
    bit = (cell_bits[cand_cell, j // _BITS] >> (j % _BITS)) & 1
    keep = bit == 0
    cand_pair = first_pair[cell_ex_u[cand_cell]] + j
    P = pair_ex.numel()
    comp_cell = torch.cat([cand_cell[keep], Ncu + pair_ex])
    comp_pair = torch.cat([cand_pair[keep], torch.arange(P, device=device)])
    return comp_cell, comp_pair
