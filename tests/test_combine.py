"""The KL combiner (paper section 5.4), its solvers, special cases, bad input, and the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from combine import active_specialists, kl_combine, kl_objective
from combine.baselines import average_of_distributions, product_of_experts
from combine.evaluate import evaluate_predictions, evaluate_split
from combine.metrics import conditional_accuracy, expected_calibration_error, negative_log_likelihood, table4
from combine.outputs import SplitOutputs
from specdistill.config import CombineConfig
from specdistill.errors import SpecdistillError
from specdistill.records import CombineResult, SpecialistInfo
from specdistill.rundir import RunDir
from testkit.reference_combine import paper_gradient_descent, reference_solve


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny ops per test: on a shared 2-core machine threads only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_instance(seed: int, K: int, M: int, B: int, scale: float, dtype=torch.float64,
                    group_size: int | None = None):
    g = torch.Generator().manual_seed(seed)
    gen = torch.log_softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * scale, 1).to(dtype)
    groups = []
    for _ in range(M):
        size = group_size or int(torch.randint(1, K + 1, (1,), generator=g))
        groups.append(torch.randperm(K, generator=g)[:size])
    specs = [torch.log_softmax(torch.randn(B, len(gr) + 1, generator=g, dtype=torch.float64) * scale, 1).to(dtype)
             for gr in groups]
    return gen, groups, specs


def reference_objectives(gen, groups, specs, active) -> torch.Tensor:
    """The reference solver's objective for every row with an active specialist (NaN otherwise)."""
    out = torch.full((gen.shape[0],), torch.nan, dtype=torch.float64)
    for b in range(gen.shape[0]):
        ms = active[b].nonzero().squeeze(1).tolist()
        if not ms:
            continue
        ref = reference_solve(gen[b], [groups[m] for m in ms], [specs[m][b] for m in ms])
        out[b] = kl_objective(ref[None], gen[b:b + 1], groups, [s[b:b + 1] for s in specs], active[b:b + 1])[0]
    return out


def class_em_step(lq, gen, groups, specs, active):
    """The EM update written over all K classes, straight from the derivation (a test oracle)."""
    return dense_em_step(lq, gen, dense_specialists(groups, specs, gen.shape[1]), active)


def dense_em_step(lq, gen, dense, active):
    """:func:`class_em_step` on the specialists laid out over all classes once (:func:`dense_specialists`):
    each active specialist adds its group's probabilities and spreads its dustbin over the classes outside
    its group in proportion to q; the sum is averaged with the generalist. Vectorised over specialists
    ([B, M, K]), so thousands of steps over 70 specialists take a second."""
    inside, outside, dustbin = dense
    q = torch.exp(lq)
    out_mass = (q[:, None, :] * outside).sum(2, keepdim=True)                   # [B, M, 1]
    add = inside + outside * q[:, None, :] * dustbin / out_mass                  # [B, M, K]
    num = torch.exp(gen) + (add * active[:, :, None]).sum(1)
    return torch.log(num / (1 + active.sum(1, keepdim=True)))


def dense_specialists(groups, specs, num_classes):
    """Each specialist over all classes: its group probabilities [B, M, K] (0 outside), the mask of
    classes outside its group [M, K] and its dustbin probability [B, M, 1]."""
    B, M = specs[0].shape[0], len(groups)
    inside = torch.zeros(B, M, num_classes, dtype=torch.float64)
    outside = torch.ones(M, num_classes, dtype=torch.float64)
    dustbin = torch.zeros(B, M, 1, dtype=torch.float64)
    for m, group in enumerate(groups):
        p = torch.softmax(specs[m], 1)
        inside[:, m, group] = p[:, :-1]
        outside[m, group] = 0.0
        dustbin[:, m, 0] = p[:, -1]
    return inside, outside, dustbin


# ----------------------------------------------------------------------------------------------
# solvers against the high-precision reference


def test_fixed_point_matches_reference_on_random_instances():
    rng = np.random.default_rng(0)
    rel_errors = []
    for trial in range(24):
        K, M = int(rng.integers(2, 30)), int(rng.integers(1, 7))
        scale = float(rng.choice([0.5, 2.0, 5.0, 10.0]))
        gen, groups, specs = random_instance(trial, K, M, 4, scale)
        lq, info = kl_combine(gen, groups, specs, top_n=int(rng.integers(1, 4)), return_info=True)
        obj = kl_objective(lq, gen, groups, specs, info["active"])
        ref = reference_objectives(gen, groups, specs, info["active"])
        rows = ~torch.isnan(ref)
        rel_errors += ((obj[rows] - ref[rows]).abs() / ref[rows].abs().clamp_min(1e-12)).tolist()
        assert torch.isfinite(lq).all()
        assert torch.allclose(lq.logsumexp(1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert len(rel_errors) >= 60
    assert max(rel_errors) < 1e-6


@pytest.mark.parametrize("scale,iterations", [(0.5, 2500), (1.0, 4000)])
def test_gradient_descent_matches_reference(scale, iterations):
    """The paper's method gets there on moderately peaked inputs (on peaked ones it does not: the
    objective gap of classes that must shrink falls like 1/t; see BENCHMARKS.md)."""
    gen, groups, specs = random_instance(7, 20, 5, 12, scale, group_size=6)
    lq, info = kl_combine(gen, groups, specs, top_n=2, solver="gradient", max_iter=iterations, tol=0.0,
                          return_info=True)
    obj = kl_objective(lq, gen, groups, specs, info["active"])
    ref = reference_objectives(gen, groups, specs, info["active"])
    rows = ~torch.isnan(ref)
    assert rows.sum() >= 8
    assert ((obj[rows] - ref[rows]).abs() / ref[rows]).max() < 1e-6


@pytest.mark.parametrize("solver", ["em", "fixed_point"])
def test_fixed_point_decreases_the_objective_monotonically(solver):
    gen, groups, specs = random_instance(3, 25, 6, 16, 3.0, group_size=8)
    active = active_specialists(gen, groups, 3)
    objs = torch.stack([kl_objective(kl_combine(gen, groups, specs, solver=solver, max_iter=t, tol=0.0,
                                                active=active), gen, groups, specs, active) for t in range(26)])
    steps = objs[1:] - objs[:-1]
    assert (steps <= 1e-12 * objs[:-1].abs()).all()
    multi = active.sum(1) >= 2
    assert (objs[-1][multi] < objs[0][multi] - 1e-6).all()  # it does move


def test_cells_give_the_same_optimum_as_em_over_all_classes():
    """EM over every class (the derivation, written densely) and the cell solver agree."""
    gen, groups, specs = random_instance(11, 15, 4, 10, 2.0, group_size=6)
    active = active_specialists(gen, groups, 2)
    lq, dense = gen.clone(), dense_specialists(groups, specs, gen.shape[1])
    for _ in range(3000):
        lq = dense_em_step(lq, gen, dense, active)
    for solver in ("em", "fixed_point"):
        ours = kl_combine(gen, groups, specs, active=active, solver=solver, max_iter=3000, tol=1e-14)
        assert torch.allclose(torch.exp(ours), torch.exp(lq), atol=1e-9), solver


def test_more_active_specialists_than_one_mask_word():
    """70 specialists active at once: cell masks span two int64 words, and rows with different
    active sets share one batch. The cell solver agrees with dense EM over every class."""
    g = torch.Generator().manual_seed(21)
    K, M, B = 16, 70, 5
    gen = torch.log_softmax(torch.randn(B, K, generator=g, dtype=torch.float64), 1)
    groups = [torch.randperm(K, generator=g)[:int(torch.randint(1, 5, (1,), generator=g))] for _ in range(M)]
    specs = [torch.log_softmax(torch.randn(B, len(gr) + 1, generator=g, dtype=torch.float64), 1) for gr in groups]
    active = torch.ones(B, M, dtype=torch.bool)
    active[1, 3:40] = False           # a second set in the same batch
    active[2] = active[1]             # ... shared by two rows
    lq = gen.clone()
    dense = dense_specialists(groups, specs, K)
    for _ in range(4000):
        lq = dense_em_step(lq, gen, dense, active)
    ours = kl_combine(gen, groups, specs, active=active, max_iter=2000, tol=1e-14)
    assert torch.allclose(torch.exp(ours), torch.exp(lq), atol=1e-9)
    # the blocked passes over [B, K] rely on the atoms coming sorted by example, each example's
    # classes once: its active groups' union
    from combine.inputs import check_inputs
    from combine.problem import build_problem
    problem = build_problem(check_inputs(gen, groups, specs), active)
    assert bool((problem.atom_ex[1:] >= problem.atom_ex[:-1]).all())
    for e in range(B):
        union = torch.unique(torch.cat([groups[m] for m in active[e].nonzero().squeeze(1).tolist()]))
        assert torch.equal(problem.atom_class[problem.atom_ex == e].sort().values, union)


def test_bounded_segment_logsumexp_matches_the_stable_one():
    """The one-pass version for log-probabilities falls back to the stable one where a segment's sum
    underflows (all its values below ~-667, or -inf), so no segment becomes log 0 by mistake."""
    from combine.problem import segment_logsumexp, segment_logsumexp_bounded
    values = torch.tensor([-0.1, -2.0, -800.0, -801.0, -torch.inf, -torch.inf, -5.0, -1000.0],
                          dtype=torch.float64)
    segments = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    got = segment_logsumexp_bounded(values, segments, 5, 0.0)
    want = segment_logsumexp(values, segments, 5)
    assert torch.equal(torch.isinf(got), torch.isinf(want))           # segments 2 and 4 are empty of mass
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], rtol=0, atol=1e-12)
    assert float(got[1]) == pytest.approx(-800.0 + np.log1p(np.exp(-1.0)), abs=1e-9)


def test_weight_two_counts_a_specialist_twice_and_zero_silences_it():
    """Per-model weights in eq. 5: w_m = 2 is the same as listing specialist m twice, w_m = 0 the
    same as leaving it inactive, and a fractional weight reaches the weighted objective's optimum."""
    gen, groups, specs = random_instance(13, 14, 3, 8, 2.0, group_size=5)
    active = active_specialists(gen, groups, 2)
    twice = kl_combine(gen, groups + [groups[1]], specs + [specs[1]],
                       active=torch.cat([active, active[:, 1:2]], 1), tol=1e-13)
    weighted = kl_combine(gen, groups, specs, active=active, tol=1e-13, weights=[1.0, 2.0, 1.0])
    assert torch.allclose(weighted, twice, atol=1e-10)
    off = active.clone()
    off[:, 0] = False
    silenced = kl_combine(gen, groups, specs, active=active, tol=1e-13, weights=torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(silenced, kl_combine(gen, groups, specs, active=off, tol=1e-13), atol=1e-10)
    w = [0.3, 1.7, 0.6]
    best = kl_combine(gen, groups, specs, active=active, tol=1e-13, weights=w)
    at_best = kl_objective(best, gen, groups, specs, active, weights=w)
    assert not torch.allclose(best, kl_combine(gen, groups, specs, active=active, tol=1e-13))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):   # any nearby distribution is worse under the weighted objective
        moved = torch.log_softmax(best + 0.05 * torch.randn(best.shape, generator=g, dtype=torch.float64), 1)
        assert (kl_objective(moved, gen, groups, specs, active, weights=w) >= at_best - 1e-12).all()
    # the paper's gradient descent, weighted the same way, gets there too (on gentler inputs: see
    # test_gradient_descent_matches_reference)
    gentle = torch.log_softmax(gen / 4, 1), [torch.log_softmax(s / 4, 1) for s in specs]
    paper = kl_combine(gentle[0], groups, gentle[1], active=active, solver="gradient", max_iter=4000, tol=0.0,
                       weights=w)
    assert torch.allclose(paper, kl_combine(*gentle[:1], groups, gentle[1], active=active, tol=1e-13, weights=w),
                          atol=1e-6)
    with pytest.raises(SpecdistillError, match="weights must be 3 finite numbers >= 0"):
        kl_combine(gen, groups, specs, weights=[1.0, -1.0, 1.0])


def test_average_is_one_em_step_from_the_generalist():
    gen, groups, specs = random_instance(5, 12, 4, 8, 2.0, group_size=5)
    active = active_specialists(gen, groups, 3)
    one_step = class_em_step(gen, gen, groups, specs, active)
    assert torch.allclose(average_of_distributions(gen, groups, specs, active), one_step, atol=1e-12)


def test_paper_per_example_gradient_descent_reaches_the_optimum():
    gen, groups, specs = random_instance(2, 12, 3, 1, 0.5, group_size=5)
    active = torch.ones(1, 3, dtype=torch.bool)
    best = kl_objective(kl_combine(gen, groups, specs, active=active, tol=1e-13), gen, groups, specs, active)
    lq, iters = paper_gradient_descent(gen[0], groups, [s[0] for s in specs], max_iter=20000,
                                       target=float(best[0]), rel_tol=1e-6)
    got = kl_objective(lq[None], gen, groups, specs, active)
    assert 0 < iters < 20000
    assert (got - best).abs() / best < 1e-6


# ----------------------------------------------------------------------------------------------
# exact special cases


def test_no_active_specialist_leaves_the_generalist_exactly():
    gen, groups, specs = random_instance(1, 10, 3, 6, 2.0, dtype=torch.float32, group_size=3)
    assert torch.equal(kl_combine(gen, groups, specs, active=torch.zeros(6, 3, dtype=torch.bool)), gen)
    # through the top-1 rule: groups that avoid every row's best class
    best = set(gen.argmax(1).tolist())
    others = torch.tensor([k for k in range(10) if k not in best])
    groups = [others[:2], others[1:3]]
    specs = [torch.log_softmax(torch.randn(6, 3), 1) for _ in groups]
    assert torch.equal(kl_combine(gen, groups, specs), gen)
    # in a mixed batch the inactive rows are untouched too
    groups = [torch.tensor([int(gen[0].argmax())])]
    specs = [torch.log_softmax(torch.randn(6, 2), 1)]
    out, info = kl_combine(gen, groups, specs, return_info=True)
    idle = ~info["active"][:, 0]
    assert idle.any() and not idle.all()
    assert torch.equal(out[idle], gen[idle]) and not torch.equal(out[~idle], gen[~idle])


def test_group_of_every_class_gives_the_arithmetic_mean():
    gen, _, _ = random_instance(4, 7, 1, 5, 2.0)
    group = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    spec = torch.log_softmax(torch.randn(5, 8, dtype=torch.float64), 1)   # its dustbin has mass
    p_m = torch.zeros(5, 7, dtype=torch.float64)
    p_m[:, group] = torch.softmax(spec[:, :-1], 1)        # the dustbin has no class: dropped
    expected = torch.log((torch.exp(gen) + p_m) / 2)
    for solver, iters in (("fixed_point", 200), ("gradient", 5000)):
        out = kl_combine(gen, [group], [spec], solver=solver, max_iter=iters, tol=1e-13)
        assert torch.allclose(out, expected, atol=1e-8), solver


@pytest.mark.parametrize("inside", [-1e4, -torch.inf])
def test_dustbin_with_all_the_mass_keeps_the_shape_inside_the_group(inside):
    gen, _, _ = random_instance(6, 12, 1, 4, 2.0)
    gen[:, 2] += 8.0        # make class 2 every row's best guess, so the specialist is active
    gen = torch.log_softmax(gen, 1)
    group = torch.tensor([9, 2, 5, 7])
    spec = torch.full((4, 5), inside, dtype=torch.float64)
    spec[:, -1] = 0.0
    other = torch.tensor([0, 11])   # a second active specialist, disjoint from the first
    spec2 = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), 1)
    active = torch.ones(4, 2, dtype=torch.bool)
    for groups, specs, act in (([group], [spec], None), ([group, other], [spec, spec2], active)):
        out = kl_combine(gen, groups, specs, active=act, tol=1e-13)
        assert torch.isfinite(out).all()
        shape = out[:, group] - out[:, group].logsumexp(1, keepdim=True)
        assert torch.allclose(shape, gen[:, group] - gen[:, group].logsumexp(1, keepdim=True), atol=1e-10)
    single = kl_combine(gen, [group], [spec])   # closed form with one specialist: q(S) = p_g(S) / 2
    assert torch.allclose(single[:, group].logsumexp(1), gen[:, group].logsumexp(1) - np.log(2), atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_underflowing_probabilities_stay_finite(dtype, atol):
    """The generalist puts e^-900 on every other class; the specialist says 'not class 0'."""
    K = 50
    gen = torch.full((3, K), -900.0, dtype=torch.float64)
    gen[:, 0] = 0.0
    gen = torch.log_softmax(gen, 1).to(dtype)
    spec = torch.tensor([[-1e4, 0.0]] * 3, dtype=dtype)
    out = kl_combine(gen, [torch.tensor([0])], [spec])
    assert not torch.isnan(out).any() and torch.isfinite(out).all()
    expected = torch.full((3, K), np.log(0.5 / (K - 1)), dtype=torch.float64)
    expected[:, 0] = np.log(0.5)
    assert torch.allclose(out.double(), expected, atol=atol)


def test_batched_chunked_and_row_by_row_agree():
    gen, groups, specs = random_instance(9, 18, 5, 10, 3.0, group_size=6)
    whole = kl_combine(gen, groups, specs, top_n=2, tol=1e-12)
    chunked = kl_combine(gen, groups, specs, top_n=2, tol=1e-12, chunk_size=3)
    rows = torch.cat([kl_combine(gen[b:b + 1], groups, [s[b:b + 1] for s in specs], top_n=2, tol=1e-12)
                      for b in range(10)])
    assert torch.allclose(whole, chunked, atol=1e-12) and torch.allclose(whole, rows, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_runs_on_the_inputs_device(device):
    gen, groups, specs = random_instance(8, 30, 6, 20, 2.0, dtype=torch.float32, group_size=8)
    on_cpu = kl_combine(gen, groups, specs, top_n=2)
    out = kl_combine(gen.to(device), [g.to(device) for g in groups], [s.to(device) for s in specs], top_n=2)
    assert out.device.type == device and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), on_cpu, atol=1e-5)


def test_top_n_activation():
    gen = torch.log_softmax(torch.tensor([[1.0, 3.0, 5.0, 0.0, 2.0, 4.0]]), 1)   # order: 2, 5, 1, 4, 0, 3
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4]), torch.tensor([5, 1])]
    assert active_specialists(gen, groups, 1).tolist() == [[False, True, False, False]]
    assert active_specialists(gen, groups, 2).tolist() == [[False, True, False, True]]
    assert active_specialists(gen, groups, 3).tolist() == [[True, True, False, True]]


def test_product_of_experts_with_a_full_group_is_the_normalised_product():
    gen, _, _ = random_instance(12, 6, 1, 3, 1.0)
    group = torch.arange(6)
    spec = torch.log_softmax(torch.randn(3, 7, dtype=torch.float64), 1)
    out = product_of_experts(gen, [group], [spec], torch.ones(3, 1, dtype=torch.bool))
    assert torch.allclose(out, torch.log_softmax(gen + torch.log_softmax(spec[:, :-1], 1), 1), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# bad input


def _good():
    gen, groups, specs = random_instance(0, 8, 2, 3, 1.0, group_size=3)
    return gen, groups, specs


@pytest.mark.parametrize("case,needle", [
    ("columns", "expected"), ("count", "groups but"), ("high_id", "outside"), ("negative_id", "outside"),
    ("duplicate", "twice"), ("nan_gen", "NaN"), ("nan_spec", "NaN"), ("inf_gen", "+inf"), ("top_n", "top_n"),
    ("solver", "unknown solver"), ("float_group", "integer"), ("empty_group", "empty"), ("active", "active"),
    ("rows", "expected"),
])
def test_bad_input_is_one_clear_error(case, needle):
    gen, groups, specs = _good()
    kwargs = {}
    if case == "columns":
        specs[1] = specs[1][:, :-1]
    elif case == "count":
        specs = specs[:1]
    elif case == "high_id":
        groups[0] = torch.tensor([1, 8])
        specs[0] = specs[0][:, :3]
    elif case == "negative_id":
        groups[0] = torch.tensor([-1, 2, 3])
    elif case == "duplicate":
        groups[0] = torch.tensor([2, 2, 3])
    elif case == "nan_gen":
        gen[1, 4] = torch.nan
    elif case == "nan_spec":
        specs[0][2, 0] = torch.nan
        kwargs["active"] = torch.ones(3, 2, dtype=torch.bool)
    elif case == "inf_gen":
        gen[0, 0] = torch.inf
    elif case == "top_n":
        kwargs["top_n"] = 0
    elif case == "solver":
        kwargs["solver"] = "newton"
    elif case == "float_group":
        groups[0] = groups[0].double()
    elif case == "empty_group":
        groups[0] = torch.tensor([], dtype=torch.int64)
        specs[0] = specs[0][:, :1]
    elif case == "active":
        kwargs["active"] = torch.ones(3, 5, dtype=torch.bool)
    elif case == "rows":
        specs[0] = specs[0][:2]
    with pytest.raises(SpecdistillError) as err:
        kl_combine(gen, groups, specs, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_rows_of_inactive_specialists_are_never_read():
    gen, groups, specs = _good()
    active = torch.tensor([[True, False], [False, False], [True, True]])
    expected = kl_combine(gen, groups, specs, active=active)
    specs[1][:2] = torch.nan      # what a server leaves in rows where specialist 1 did not run
    assert torch.equal(kl_combine(gen, groups, specs, active=active), expected)


def test_evaluation_rejects_labels_out_of_range():
    gen, groups, specs = _good()
    with pytest.raises(SpecdistillError, match="labels"):
        evaluate_predictions(gen, groups, specs, np.array([0, 1, 8]))


def test_stage_without_upstream_stages_exits_with_one_line(tmp_path, capsys):
    from combine.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "generalist" in err


# ----------------------------------------------------------------------------------------------
# metrics and the evaluation


def test_table4_rows():
    covering = torch.tensor([0, 0, 1, 1, 1, 2, 11, 12])
    base = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    combined = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    rows = table4(base, combined, covering)
    assert [r["covering"] for r in rows] == [str(i) for i in range(10)] + ["10+"]
    by = {r["covering"]: r for r in rows}
    assert (by["0"]["examples"], by["0"]["delta_correct"], by["0"]["relative_change"]) == (2, 0, 0.0)
    assert (by["1"]["examples"], by["1"]["delta_correct"], by["1"]["relative_change"]) == (3, 2, 2.0)
    assert (by["2"]["delta_correct"], by["2"]["relative_change"]) == (-1, -1.0)
    assert (by["10+"]["examples"], by["10+"]["delta_correct"], by["10+"]["relative_change"]) == (2, 1, 1.0)
    assert by["5"]["examples"] == 0 and by["5"]["relative_change"] is None


def test_conditional_accuracy_restricts_examples_and_predictions():
    lp = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, 5.0], [0.0, 1.0, 2.0, 5.0], [5.0, 0.0, 0.0, 0.0]]), 1)
    labels = torch.tensor([1, 1, 0])
    acc, n = conditional_accuracy(lp, labels, torch.tensor([1, 2]))
    assert (acc, n) == (0.5, 2)   # class 3 wins unrestricted, but only classes 1 and 2 may answer


def test_calibration_and_nll():
    lp = torch.log(torch.tensor([[0.8, 0.2]] * 5, dtype=torch.float64))
    labels = torch.tensor([0, 0, 0, 0, 1])   # 80% confident and 80% right: calibrated
    assert expected_calibration_error(lp, labels) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(lp, torch.ones(5, dtype=torch.long)) == pytest.approx(0.8)
    assert negative_log_likelihood(lp, labels) == pytest.approx(-(4 * np.log(0.8) + np.log(0.2)) / 5)


def informative_ensemble(N=300, K=24, seed=0):
    """A generalist that confuses classes within blocks of 6 and specialists that separate them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, N)
    block = labels // 6
    logits = rng.normal(0, 1, (N, K))
    for b in range(N):
        logits[b, block[b] * 6:(block[b] + 1) * 6] += 2.5
    logits[np.arange(N), labels] += 1.0
    gen = torch.log_softmax(torch.tensor(logits), 1)
    groups = [torch.arange(6 * i, 6 * i + 6) for i in range(3)] + [torch.tensor([4, 5, 6, 7])]
    specs = []
    for g in groups:
        inside = rng.normal(0, 1, (N, len(g)))
        member = np.isin(labels, g.numpy())
        inside[member, [int((g == y).nonzero()) for y in labels[member]]] += 3.0
        dust = np.where(member, -1.0, 2.0)[:, None]
        specs.append(torch.log_softmax(torch.tensor(np.concatenate([inside, dust], 1)), 1))
    return gen, groups, specs, torch.as_tensor(labels)


def test_evaluate_predictions_tables_add_up():
    gen, groups, specs, labels = informative_ensemble()
    result = evaluate_predictions(gen, groups, specs, labels, top_n=1)
    systems = result.split("test").systems
    assert set(systems) == {"generalist", "kl_top1", "kl_top2", "kl_top3", "average", "product"}
    t3, rows = result.table3("test"), result.split("test").table4
    assert sum(r["examples"] for r in rows) == len(labels)
    gen_correct = round(systems["generalist"]["accuracy"] * len(labels))
    ens_correct = round(systems["kl_top1"]["accuracy"] * len(labels))
    assert sum(r["delta_correct"] for r in rows) == ens_correct - gen_correct
    assert t3["ensemble_acc"] == systems["kl_top1"]["accuracy"] == result.ensemble_acc("test")
    assert t3["conditional_examples"] == int((labels < 18).sum())   # the groups cover classes 0..17
    assert t3["ensemble_acc"] > t3["generalist_acc"]   # the specialists know what the generalist confuses
    _, predictions = evaluate_split(gen, groups, specs, labels, CombineConfig(top_n=1))
    for name, lp in predictions.items():
        assert torch.allclose(lp.double().logsumexp(1), torch.zeros(len(labels), dtype=torch.float64),
                              atol=1e-6), name
    assert CombineResult.from_json(json.loads(json.dumps(result.to_json()))) == result   # eval.json round trip


# ----------------------------------------------------------------------------------------------
# the stage, end to end on tiny models


def test_run_combine_writes_the_run_directory(tiny_combine_run):
    from combine.evaluate import main, run_combine
    from specdistill.artifacts import read_npy
    from specdistill.config import Config
    from specdistill.engine import predict_log_probs
    from specialists.dustbin import specialist_log_probs

    t = tiny_combine_run
    cfg, run, dataset, test, generalist = t.cfg, t.run, t.dataset, t.dataset.test, t.generalist
    groups, corrections, spec_models = t.groups, t.corrections, t.spec_models
    result = run_combine(cfg)
    out = run / "combine"
    for name in ("eval.json", "report.md", "table4.png", "preds-val.npy", "preds-test.npy", "done.json"):
        assert (out / name).exists(), name
    preds = torch.as_tensor(read_npy(out / "preds-test.npy"))
    gen_lp = torch.as_tensor(predict_log_probs(generalist.eval(), test.images))
    spec_lp = [specialist_log_probs(model.eval(), test.images, corr) for model, corr in zip(spec_models, corrections)]
    expected = kl_combine(gen_lp, [torch.tensor(g) for g in groups], spec_lp)
    assert torch.allclose(preds, expected, atol=1e-5)
    assert result.split("test").num_examples == 40 and result.num_specialists == 2
    assert set(result.splits) == {"val", "test"}   # held-out beside test: every combine choice is made on val
    report = (out / "report.md").read_text()
    assert "Table 4" in report and "Held-out accuracy" in report and "Test accuracy" in report

    stamp = (out / "eval.json").stat().st_mtime_ns
    assert run_combine(cfg).table3() == result.table3()        # done: read back, not redone
    assert (out / "eval.json").stat().st_mtime_ns == stamp
    main(["--run-dir", str(run), "--force", "--set", "combine.top_n=2"])
    assert json.loads((out / "eval.json").read_text())["top_n"] == 2
    # calibrated: temperatures fitted on the held-out split (here the same tiny split), applied to test
    from combine.calibration import apply_temperature, fit_temperature
    from specdistill.artifacts import write_npy

    write_npy(run / "generalist" / "preds-val.npy", gen_lp.numpy())
    main(["--run-dir", str(run), "--force", "--set", "combine.calibrate=true"])
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["split"] == "val" and len(cal["specialists"]) == 2
    assert cal["generalist"] == fit_temperature(gen_lp, test.labels)
    active = active_specialists(gen_lp, [torch.tensor(g) for g in groups], 1)
    for m, classes in enumerate(groups):
        hit = active[:, m].numpy()
        local = np.where(np.isin(test.labels[hit], classes),
                         np.searchsorted(classes, test.labels[hit]), len(classes))
        assert cal["specialists"][m] == fit_temperature(spec_lp[m][hit], local)
    expected = kl_combine(apply_temperature(gen_lp, cal["generalist"]), [torch.tensor(g) for g in groups],
                          [apply_temperature(lp, t) for lp, t in zip(spec_lp, cal["specialists"])])
    assert torch.allclose(torch.as_tensor(read_npy(out / "preds-test.npy")), expected, atol=1e-5)
    # and the combination's own temperature, fitted last on held-out NLL: same predictions, other confidences,
    # and the student's ensemble teacher gives the same tempered targets
    from student.teachers import ensemble_teacher

    main(["--run-dir", str(run), "--force", "--set", "combine.calibrate=true",
          "--set", "combine.calibrate_ensemble=true"])
    tau = json.loads((out / "calibration.json").read_text())["ensemble"]
    assert tau == fit_temperature(expected, test.labels) and tau != 1.0
    tempered = torch.as_tensor(read_npy(out / "preds-test.npy"))
    assert torch.allclose(tempered, apply_temperature(expected, tau), atol=1e-5)
    assert torch.equal(tempered.argmax(1), expected.argmax(1))
    teacher = ensemble_teacher(Config(run_dir=str(run), combine={"calibrate": True, "calibrate_ensemble": True}),
                               dataset, torch.device("cpu"))
    assert torch.allclose(teacher(test.images), tempered, atol=1e-5)
    # gated: the gate is fitted on the held-out split, recorded, applied to test; off again, it is removed
    main(["--run-dir", str(run), "--force", "--set", "combine.gate=both"])
    gated = CombineResult.read(out / "eval.json")
    assert gated.gate["kind"] == "both" and (out / "gating.json").exists()
    assert "kl_top1_ungated" in gated.split("test").systems and "Gate `both`" in (out / "report.md").read_text()
    # the student's ensemble teacher is the same gated ensemble: its targets are combine's predictions
    teacher = ensemble_teacher(Config(run_dir=str(run), combine={"gate": "both"}), dataset, torch.device("cpu"))
    assert torch.allclose(teacher(test.images), torch.as_tensor(read_npy(out / "preds-test.npy")), atol=1e-5)
    main(["--run-dir", str(run), "--force"])
    assert not (out / "gating.json").exists() and CombineResult.read(out / "eval.json").gate is None


def test_temperature_fit_recovers_a_planted_temperature():
    from combine.calibration import fit_temperature

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 10, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
    assert fit_temperature(torch.log_softmax(logits * 3, 1), labels) == pytest.approx(3.0, rel=0.06)
    assert fit_temperature(torch.log_softmax(logits / 2, 1), labels) == pytest.approx(0.5, rel=0.06)
    assert fit_temperature(torch.zeros(0, 3), []) == 1.0


def test_table4_causes_names_who_broke_and_who_fixed_by_hand():
    from combine.diagnose import table4_causes

    # 4 classes; specialist 0 holds classes [0, 1] (core 0, overlap-added 1), specialist 1 holds [2, 3]
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    gen = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1],     # label 0: right -> broken by spec 0 (core)
                                  [0.3, 0.5, 0.1, 0.1],     # label 0: wrong -> fixed by spec 0 (core)
                                  [0.1, 0.5, 0.3, 0.1],     # label 2: wrong -> fixed by spec 1 (core)
                                  [0.5, 0.2, 0.2, 0.1]]))   # label 1: wrong, unchanged
    combined = torch.log(torch.tensor([[0.3, 0.5, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1],
                                       [0.1, 0.3, 0.5, 0.1], [0.5, 0.2, 0.2, 0.1]]))
    labels = torch.tensor([0, 0, 2, 1])
    spec0 = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.5, 0.3, 0.2]]))
    spec1 = torch.log(torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]))
    active = torch.tensor([[True, False], [True, False], [True, True], [True, False]])
    covering = torch.tensor([1, 1, 1, 1])
    rows = table4_causes(gen, combined, labels, groups, [spec0, spec1], active, covering, num_core=[1, 2])
    assert [r["covering"] for r in rows] == ["0", "1"] and rows[1]["examples"] == 4
    row = rows[1]
    assert (row["broken"], row["fixed"]) == (1, 2)
    assert row["broken_by"] == {"core": 1, "overlap": 0, "dustbin": 0, "none active": 0}
    # example 2: spec 0 sees label 2 through its dustbin (0.4 vs the generalist's 0.4: no push), spec 1
    # raises class 2 from the generalist's 0.3 to 0.9: the fix is spec 1's, a core member
    assert row["fixed_by"] == {"core": 2, "overlap": 0, "dustbin": 0, "none active": 0}
    # the same break with class 0 outside spec 0's core: counted as an overlap member
    rows = table4_causes(gen, combined, labels, groups, [spec0, spec1], active, covering, num_core=[0, 2])
    assert rows[1]["broken_by"]["overlap"] == 1


def test_group_gain_gate_closes_a_specialist_that_hurts_on_held_out_data():
    from combine.gating import Gate, fit_gate

    gen, groups, specs, labels = informative_ensemble()
    rule = CombineConfig(top_n=1)
    liar = torch.log_softmax(-specs[0].double(), dim=1).float()     # specialist 0 now says the opposite
    outputs = [liar, *specs[1:]]
    gate = fit_gate("group_gain", SplitOutputs.from_arrays(gen, groups, outputs, labels), rule,
                    progress=lambda line: None)
    assert gate.keep[0] is False and all(gate.keep[1:])
    assert gate.held_out["gated_acc"] > gate.held_out["ungated_acc"]
    result, _ = evaluate_split(gen, groups, outputs, labels, rule, gate=gate)
    assert result.systems["kl_top1"]["accuracy"] == pytest.approx(gate.held_out["gated_acc"])
    assert result.systems["kl_top1_ungated"]["accuracy"] == pytest.approx(gate.held_out["ungated_acc"])
    # closed specialists and confident examples never activate
    gate = Gate("confidence", [True] * len(groups), threshold=0.0)
    assert not gate.apply(active_specialists(gen, groups, 1), gen).any()


def test_a_gate_never_scores_below_consulting_every_specialist_on_held_out_data(monkeypatch):
    """group_gain judges each specialist alone; when the kept set then does worse on held-out data than
    every specialist together, the gate falls back to consulting every one."""
    from combine import gating

    gen, groups, specs, labels = informative_ensemble()
    real = gating._correct

    def alone_looks_harmful(gen_lp, groups_, outputs, active, labels_, rule):
        right = real(gen_lp, groups_, outputs, active, labels_, rule)
        return torch.zeros_like(right) if len(labels_) < len(labels) else right   # the one-specialist pass

    monkeypatch.setattr(gating, "_correct", alone_looks_harmful)
    gate = gating.fit_gate("both", SplitOutputs.from_arrays(gen, groups, specs, labels), CombineConfig(top_n=1),
                           progress=lambda line: None)
    record = gate.held_out
    assert record["group_gains"] and all(g < 0 for g in record["group_gains"] if g)
    assert record["ungated_acc"] > max(record["threshold_candidates"].values())   # the kept set alone is worse
    assert gate.keep == [True] * len(groups) and gate.threshold == 1.0 and record["fell_back_to_open"]
    assert record["gated_acc"] == record["ungated_acc"]


def test_confidence_gate_is_chosen_on_held_out_data_and_read_back(tmp_path):
    from combine.gating import Gate, fit_gate

    gen, groups, specs, labels = informative_ensemble()
    gate = fit_gate("confidence", SplitOutputs.from_arrays(gen, groups, specs, labels), CombineConfig(top_n=1),
                    progress=lambda line: None)
    scores = gate.held_out["threshold_candidates"]
    assert gate.held_out["gated_acc"] == max(scores.values()) >= gate.held_out["generalist_acc"]
    gate.write(tmp_path / "gating.json")
    assert Gate.read(tmp_path / "gating.json", len(groups)) == gate
    with pytest.raises(SpecdistillError, match="gates .* specialists but the run has"):
        Gate.read(tmp_path / "gating.json", len(groups) + 1)


def test_fitted_weights_silence_a_liar_and_trust_a_good_specialist(tmp_path):
    """combine.weighting=fitted: on held-out outputs a specialist that says the opposite of the truth
    gets weight 0, the informative ones keep a weight of at least 1; the evaluation applies the
    weights, and the record reads back (and is refused for another number of specialists)."""
    from combine.gating import WEIGHT_GRID, Gate, fit_weights

    gen, groups, specs, labels = informative_ensemble()
    liar = torch.log_softmax(-specs[0].double(), dim=1).float()
    outputs = [liar, *specs[1:]]
    rule = CombineConfig(top_n=1, weighting="fitted")
    gate = fit_weights(SplitOutputs.from_arrays(gen, groups, outputs, labels), rule, Gate.open(len(groups)),
                       progress=lambda line: None)
    assert gate.weights[0] == 0.0 and gate.weights[1] >= 1.0 and gate.weights[2] >= 1.0
    assert set(gate.weights) <= set(WEIGHT_GRID) and not gate.is_open
    record = gate.held_out
    # the first round tries each specialist's weights with every other specialist at 1: its log-loss
    # at weight 1 is the equal-weight ensemble's on the rows where it speaks
    first = record["weight_rounds"][0]
    equal = kl_combine(gen, groups, outputs).double()
    active = active_specialists(gen, groups, 1)
    for m in range(len(groups)):
        rows = active[:, m]
        if rows.any():
            nll = float(-equal[rows].gather(1, labels[rows][:, None]).mean())
            assert first["log_loss"][m][WEIGHT_GRID.index(1.0)] == pytest.approx(nll, abs=1e-4)
    assert record["weighted_acc"] > record["equal_weights_acc"]
    assert record["weighted_acc"] > record["generalist_acc"]
    result, systems = evaluate_split(gen, groups, outputs, labels, rule, gate=gate)
    assert result.systems["kl_top1"]["accuracy"] == pytest.approx(record["weighted_acc"])
    assert result.systems["kl_top1_ungated"]["accuracy"] == pytest.approx(record["equal_weights_acc"])
    expected = kl_combine(gen, groups, outputs, weights=gate.weights, active=gate.apply(
        active_specialists(gen, groups, 1), gen))
    assert torch.allclose(systems["kl_top1"], expected, atol=1e-6)
    gate.write(tmp_path / "gating.json")
    assert Gate.read(tmp_path / "gating.json", len(groups)) == gate
    raw = json.loads((tmp_path / "gating.json").read_text())
    raw["weights"] = raw["weights"][:-1]
    (tmp_path / "gating.json").write_text(json.dumps(raw))
    with pytest.raises(SpecdistillError, match="weights 3 specialists but the run has 4"):
        Gate.read(tmp_path / "gating.json", len(groups))


def test_kl_combine_writes_into_a_given_buffer_and_chunks_change_nothing():
    """``out=``: the same log q as a fresh array, written in place; a buffer of another shape is one
    line. SplitOutputs read in chunks of 7 rows give evaluate_split's numbers on the whole arrays (to
    the solver's tolerance)."""
    gen, groups, specs, labels = informative_ensemble()
    fresh = kl_combine(gen, groups, specs)
    buffer = torch.full_like(gen, float("nan"))
    assert kl_combine(gen, groups, specs, out=buffer) is buffer
    assert torch.equal(buffer, fresh)
    with pytest.raises(SpecdistillError, match="out is"):
        kl_combine(gen, groups, specs, out=torch.empty(len(gen), gen.shape[1] + 1))
    rule = CombineConfig(top_n=1)
    whole, _ = evaluate_split(gen, groups, specs, labels, rule)
    from combine.evaluate import evaluate_outputs

    chunked = evaluate_outputs(SplitOutputs.from_arrays(gen, groups, specs, labels, chunk_rows=7), rule)
    assert chunked.table4 == whole.table4 and chunked.table4_causes == whole.table4_causes
    same = ("mean", "none", "histogram")   # solver iterations depend on the batch (converged rows wait)
    assert {k: chunked.active_specialists[k] for k in same} == {k: whole.active_specialists[k] for k in same}
    for name, numbers in whole.systems.items():
        assert chunked.systems[name] == pytest.approx(numbers, rel=1e-9), name
    alone = evaluate_outputs(SplitOutputs.from_arrays(gen, groups, specs, labels, top_ns=[1]),
                             rule.model_copy(update={"alternatives": False}))
    assert set(alone.systems) == {"generalist", "kl_top1"}
    assert alone.systems["kl_top1"] == pytest.approx(whole.systems["kl_top1"], rel=1e-12)


def test_rivals_train_the_generalist_longer_and_from_another_seed(tmp_path, monkeypatch, capsys):
    """combine.rivals: the generalist recipe trained for the specialists' extra compute, and the mean of
    two seeds' generalists, scored on the same examples; added to a finished combine stage without
    redoing it; refused in one line for an imported generalist."""
    from combine.evaluate import run_combine
    from generalist.rivals import ensure_longer_generalist
    from generalist.train import train_generalist
    from specdistill import data as data_module
    from specdistill.artifacts import read_json, read_npy
    from specdistill.config import stage_hash, validate_config
    from specdistill.models import load_classifier, save_classifier
    from specdistill.provenance import mark_done
    from specialists.model import make_specialist

    data = blocks_dataset()
    monkeypatch.setattr(data_module, "load_data", lambda cfg, seed=0: data)
    tree = blocks_tree(tmp_path)
    cfg = validate_config(tree)
    run = RunDir.of(cfg)
    train_generalist(cfg, run.generalist, dataset=data, progress=False)
    assert read_json(run.generalist_meta)["metrics"]["images_seen"] == 2 * 200   # counted by the engine
    mark_done(run.root, "generalist", stage_hash(cfg, "generalist"))
    generalist, meta = load_classifier(run.generalist_weights)
    features = generalist.features(torch.as_tensor(data.train.images[:64]).float().div(127.5).sub(1)[:, None])
    for m, classes in enumerate(([0, 1, 2], [3, 4])):
        spec = make_specialist(generalist, classes, features.detach(), dustbin_init="lstsq")
        save_classifier(run.specialist_weights(m), spec, {**meta, "num_classes": len(classes) + 1})
        SpecialistInfo(m, classes, [f"c{c}" for c in classes], 0.0,
                       metrics={"images_seen": 310 if m == 0 else 290}).write(run.specialist_info(m))
    mark_done(run.root, "specialists", stage_hash(cfg, "specialists"), ids=[0, 1])
    run_combine(cfg)                                          # without rivals first
    done_stamp = run.done("combine").stat().st_mtime_ns
    assert CombineResult.read(run.combine_eval).rivals is None

    with_rivals = validate_config({**tree, "combine": {"alternatives": False, "rivals": True}})
    result = run_combine(with_rivals)                          # finished stage: the rivals are added to it
    assert run.done("combine").stat().st_mtime_ns == done_stamp   # the ensemble was not redone
    rivals = CombineResult.read(run.combine_eval).rivals
    assert rivals == result.rivals and rivals["specialist_images"] == 600 and rivals["specialist_images_exact"]
    longer = rivals["longer"]
    assert (longer["extra_epochs"], longer["epochs"]) == (3, 5)  # 600 images / 200 per epoch
    longer_meta = read_json(run.root / "generalist-epochs5" / "meta.json")
    assert longer_meta["metrics"]["images_seen"] == 5 * 200 and longer["test"] == longer_meta["metrics"]["test_acc"]
    for split, labels in (("val", data.val.labels), ("test", data.test.labels)):   # mean of the two distributions
        probs = sum(np.exp(read_npy(RunDir.preds_in(folder, split)))
                    for folder in (run.generalist, run.generalist_seed(1)))
        assert rivals["seeds"][split] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert rivals["seeds"]["seeds"] == [0, 1]
    report = run.combine_report.read_text()
    assert "## Compute-matched rivals" in report and "Generalist trained 5 epochs" in report
    assert "seeds 0, 1" in report and "600 training images" in report
    assert "accuracy of the rivals" in capsys.readouterr().out
    from specdistill.report import headline  # the run's summary names them too

    summary = headline(with_rivals)
    assert summary["generalist 5 epochs test acc"] == longer["test"]
    assert summary["2 generalists test acc"] == rivals["seeds"]["test"]
    # a second run reuses both rivals' folders: nothing is trained again
    rival_weights = [RunDir.weights_in(f) for f in (run.root / "generalist-epochs5", run.generalist_seed(1))]
    stamps = [path.stat().st_mtime_ns for path in rival_weights]
    run_combine(with_rivals, force=True)
    assert [path.stat().st_mtime_ns for path in rival_weights] == stamps
    # a rival folder of another recipe (here: its done.json rewritten as if by an older specdistill that
    # did not stretch the patience) is trained and scored again; the ensemble is not redone
    marker = run.done("generalist-epochs5")
    marker.write_text(marker.read_text().replace(read_json(marker)["config_hash"], "0" * 16))
    capsys.readouterr()
    done_stamp = run.done("combine").stat().st_mtime_ns
    run_combine(with_rivals)
    assert "scoring the rivals again: generalist-epochs5/" in capsys.readouterr().out
    assert rival_weights[0].stat().st_mtime_ns != stamps[0] and rival_weights[1].stat().st_mtime_ns == stamps[1]
    assert run.done("combine").stat().st_mtime_ns == done_stamp
    assert CombineResult.read(run.combine_eval).rivals["longer"]["epochs_run"] == 5

    imported = validate_config({**tree, "generalist": {**tree["generalist"], "weights": str(run.generalist_weights)}})
    with pytest.raises(SpecdistillError, match="no recipe to repeat"):
        ensure_longer_generalist(imported, data, 5)


def test_the_longer_rival_stretches_early_stopping_with_its_schedule(tmp_path, monkeypatch):
    """A 20-epoch recipe with patience 4 trained 65 epochs for the rival waits 13 epochs (4 x 65 / 20,
    rounded up) before it stops: its learning rate stays high for longer. The folder is marked done for
    that stretched recipe; without patience there is nothing to stretch."""
    import generalist.train as stage
    from generalist.rivals import ensure_longer_generalist, stretched, with_epochs
    from specdistill.config import stage_hash, validate_config
    from specdistill.provenance import is_done, mark_done

    tree = blocks_tree(tmp_path, epochs=20)
    tree["generalist"]["train"]["patience"] = 4
    cfg = validate_config(tree)
    longer = stretched(cfg, 65)
    assert (longer.generalist.train.epochs, longer.generalist.train.patience) == (65, 13)
    assert longer.generalist.train.model_dump(exclude={"epochs", "patience"}) == \
        cfg.generalist.train.model_dump(exclude={"epochs", "patience"})
    assert with_epochs(cfg, 65, 4).generalist.train.patience == 4       # adoption compares exact recipes
    no_patience = validate_config(blocks_tree(tmp_path, epochs=20))
    assert stretched(no_patience, 65).generalist.train.patience is None
    mark_done(RunDir.of(cfg).root, "generalist", stage_hash(cfg, "generalist"))
    trained = []
    monkeypatch.setattr(stage, "train_generalist", lambda variant, folder, **kw: trained.append(variant))
    folder = ensure_longer_generalist(cfg, blocks_dataset(), 65, progress=False)
    assert [v.generalist.train.patience for v in trained] == [13]
    assert is_done(RunDir.of(cfg).root, folder.name, stage_hash(longer, "generalist"))


def blocks_dataset():
    """Six classes, each a brighter block on noise: 200 training, 120 held-out, 120 test images."""
    from specdistill.data import Dataset, Split

    def blocks(n, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 6, n)
        images = rng.random((n, 12, 12)) * 200
        for i, y in enumerate(labels):
            images[i, (y // 3) * 6:(y // 3) * 6 + 6, (y % 3) * 4:(y % 3) * 4 + 4] += 60
        return Split(np.clip(images, 0, 255).astype(np.uint8), labels)

    return Dataset("blocks", [f"c{k}" for k in range(6)], blocks(200, 0), blocks(120, 1), blocks(120, 2))


def blocks_tree(tmp_path, epochs=2, lr=0.05):
    return {"run_dir": str(tmp_path / "run"), "device": "cpu", "data": {"augment": False},
            "generalist": {"model": {"name": "mlp", "hidden": [16]},
                           "train": {"epochs": epochs, "batch_size": 50, "lr": lr, "amp": False}},
            "combine": {"alternatives": False}}


def test_a_config_asking_for_a_rivals_recipe_adopts_it_and_keeps_the_generalist_it_replaces(tmp_path, monkeypatch,
                                                                                            capsys):
    """combine.rivals trained generalist-epochs3/; a config with generalist.train.epochs=3 makes it the run's
    generalist without training, and the 2-epoch generalist becomes generalist-epochs2/ (and back); the same
    for seed=1 and generalist-seed1/. A rival of another recipe (another lr) is not adopted."""
    import generalist.train as stage
    from generalist.rivals import ensure_generalists, ensure_longer_generalist
    from specdistill.config import stage_hash, validate_config
    from specdistill.hashing import digest_file
    from specdistill.provenance import is_done

    data = blocks_dataset()
    monkeypatch.setattr(stage, "load_data", lambda cfg, seed=0: data)
    two, three = (validate_config(blocks_tree(tmp_path, epochs)) for epochs in (2, 3))
    run = RunDir.of(two)
    stage.run_generalist(two, progress=False)
    ensure_longer_generalist(two, data, 3, progress=False)
    ensure_generalists(two, data, [1], progress=False)
    weights = {e: digest_file(RunDir.weights_in(run.root / f"generalist-epochs{e}" if e == 3 else run.generalist))
               for e in (2, 3)}
    seed_one = digest_file(RunDir.weights_in(run.generalist_seed(1)))

    def no_training(*args, **kwargs):
        raise AssertionError("trained a generalist that was already trained")

    monkeypatch.setattr(stage, "train_generalist", no_training)
    capsys.readouterr()
    meta = stage.run_generalist(three, progress=False)
    out = capsys.readouterr().out
    assert "already trained as a rival" in out and "adopted" in out and "kept as a rival" in out, out
    assert digest_file(run.generalist_weights) == weights[3] and meta["metrics"]["epochs_run"] == 3
    assert digest_file(RunDir.weights_in(run.root / "generalist-epochs2")) == weights[2]
    assert is_done(run.root, "generalist", stage_hash(three, "generalist"))
    assert is_done(run.root, "generalist-epochs2", stage_hash(two, "generalist"))
    assert not (run.root / "generalist-epochs3").exists()
    stage.run_generalist(two, progress=False)                 # and back: nothing trained either way
    assert digest_file(run.generalist_weights) == weights[2]
    assert is_done(run.root, "generalist-epochs3", stage_hash(three, "generalist"))
    capsys.readouterr()
    one = validate_config({**blocks_tree(tmp_path), "seed": 1})
    assert stage.run_generalist(one, progress=False)["seed"] == 1
    assert "(seed 0) is kept as a rival" in capsys.readouterr().out
    assert digest_file(run.generalist_weights) == seed_one
    assert digest_file(RunDir.weights_in(run.generalist_seed(0))) == weights[2]
    assert is_done(run.root, "generalist-seed0", stage_hash(two, "generalist"))
    stage.run_generalist(two, progress=False)
    assert digest_file(run.generalist_weights) == weights[2]

    monkeypatch.undo()
    monkeypatch.setattr(stage, "load_data", lambda cfg, seed=0: data)
    capsys.readouterr()
    other = validate_config(blocks_tree(tmp_path, epochs=3, lr=0.02))   # generalist-epochs3/ is not this recipe
    stage.run_generalist(other, progress=False)
    assert "adopted" not in capsys.readouterr().out
    assert digest_file(run.generalist_weights) not in weights.values()
    assert digest_file(RunDir.weights_in(run.root / "generalist-epochs3")) == weights[3]


def test_adopting_a_stretched_rival_keeps_the_generalist_it_replaces_and_back(tmp_path, monkeypatch, capsys):
    """The longer rival has its patience stretched (2 -> 5 epochs: patience 1 -> 3). A config asking for
    that recipe (epochs 5, patience 3) adopts it, and the 2-epoch generalist of patience 1 is kept as
    generalist-epochs2/ for its own recipe (its done.json names the patience), so asking for it again
    trains nothing either way."""
    import generalist.train as stage
    from generalist.rivals import ensure_longer_generalist
    from specdistill.config import stage_hash, validate_config
    from specdistill.hashing import digest_file
    from specdistill.provenance import is_done

    data = blocks_dataset()
    monkeypatch.setattr(stage, "load_data", lambda cfg, seed=0: data)
    trees = [blocks_tree(tmp_path, epochs) for epochs in (2, 5)]
    for tree, patience in zip(trees, (1, 3), strict=True):
        tree["generalist"]["train"]["patience"] = patience
    two, five = (validate_config(tree) for tree in trees)
    run = RunDir.of(two)
    stage.run_generalist(two, progress=False)
    longer = ensure_longer_generalist(two, data, 5, progress=False)
    assert is_done(run.root, longer.name, stage_hash(five, "generalist"))
    weights = {2: digest_file(run.generalist_weights), 5: digest_file(RunDir.weights_in(longer))}

    def no_training(*args, **kwargs):
        raise AssertionError("trained a generalist that was already trained")

    monkeypatch.setattr(stage, "train_generalist", no_training)
    capsys.readouterr()
    stage.run_generalist(five, progress=False)
    assert "kept as a rival" in capsys.readouterr().out
    assert digest_file(run.generalist_weights) == weights[5]
    assert is_done(run.root, "generalist-epochs2", stage_hash(two, "generalist"))
    stage.run_generalist(two, progress=False)
    assert digest_file(run.generalist_weights) == weights[2]
    assert is_done(run.root, "generalist-epochs5", stage_hash(five, "generalist"))
