"""Clustering stage: planted groups recovered, overlap and coverage, determinism, the scalable path,
bad input through the CLI, and the CLI end to end on a fake run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from clustering.build import main
from clustering.cluster import cluster_classes
from clustering.matrices import MATRIX_KINDS, PredictionMatrix
from clustering.overlap import coverage, drop_small, groups_from_labels
from clustering.predictions import check_dense, check_sparse, soften
from specdistill.artifacts import write_json, write_npy
from specdistill.config import Config, stage_hash
from specdistill.provenance import mark_done
from testkit.synthetic_predictions import make_synthetic_predictions


@pytest.fixture(scope="module")
def planted():
    """120 classes in 20 planted groups of 6, class frequencies spread log-normally (sigma 1)."""
    return make_synthetic_predictions(120, 6000, 6, mates_per_row=4, dense=True, seed=3)


def test_synthetic_rows_are_probabilities_and_groups_planted(planted):
    assert planted.probs.shape == (6000, 120)
    np.testing.assert_allclose(planted.probs.sum(1), 1.0, atol=1e-5)
    assert np.bincount(planted.group_of).tolist() == [6] * 20
    # the mass off the true class lands mostly inside the true class's group
    top2 = np.argsort(-planted.probs, axis=1)[:, 1]
    assert (planted.group_of[top2] == planted.group_of[planted.labels]).mean() > 0.7
    head = make_synthetic_predictions(120, 6000, 6, mates_per_row=4, seed=3).probs
    assert sp.issparse(head) and head.getnnz(axis=1).max() <= 1 + 4 + 2
    np.testing.assert_allclose(np.asarray(head.sum(1)).ravel(), 0.98, atol=1e-5)


@pytest.mark.parametrize("backend", ["sklearn", "minibatch", "faiss"])
def test_planted_groups_recovered_by_each_backend(planted, backend):
    result = cluster_classes(planted.probs, 20, backend=backend, seed=0, progress=False)
    assert adjusted_rand_score(planted.group_of, result.labels) >= 0.9


def test_plain_covariance_is_what_the_default_matrix_beats(planted):
    # the reason for the default: a frequent class's variance on the diagonal hides its group
    plain = cluster_classes(planted.probs, 20, matrix="covariance", seed=0, progress=False)
    best = cluster_classes(planted.probs, 20, seed=0, progress=False)
    assert adjusted_rand_score(planted.group_of, best.labels) > adjusted_rand_score(
        planted.group_of, plain.labels) + 0.3


@pytest.mark.parametrize("backend", ["sklearn", "minibatch", "faiss"])
def test_same_seed_same_groups(planted, backend):
    runs = [cluster_classes(planted.probs, 20, backend=backend, seed=7, size=9, progress=False)
            for _ in range(2)]
    assert len(runs[0].groups) == len(runs[1].groups)
    for a, b in zip(runs[0].groups, runs[1].groups):
        np.testing.assert_array_equal(a, b)


def test_sketch_of_top_k_agrees_with_exact_dense(planted):
    dense = cluster_classes(planted.probs, 20, seed=0, progress=False)
    top_k, _ = check_dense(planted.probs, "planted", top_k=12, progress=False)
    assert sp.issparse(top_k) and top_k.getnnz(axis=1).max() == 12
    sketch = cluster_classes(top_k, 20, seed=0, sketch_dim=64, progress=False)
    assert adjusted_rand_score(dense.labels, sketch.labels) >= 0.95


@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_matrix_products_match_the_dense_matrix(kind):
    synth = make_synthetic_predictions(40, 800, 4, dense=True, seed=1)
    omega = np.random.default_rng(0).standard_normal((40, 5))
    for probs in (synth.probs, sp.csr_matrix(synth.probs)):
        exact = PredictionMatrix(probs, kind)
        dense = exact.dense(progress=False).copy()
        lazy = PredictionMatrix(probs, kind)
        lazy.b = exact.b.copy()              # normalized kinds: the exact column norms
        np.testing.assert_allclose(lazy.matmul(omega), dense @ omega, atol=2e-4 * np.abs(dense).max())
        np.testing.assert_allclose(lazy.rmatmul(omega), dense.T @ omega, atol=2e-4 * np.abs(dense).max())
        if "normalized" in kind:
            np.testing.assert_allclose(np.linalg.norm(dense, axis=0)[exact.b > 0], 1.0, atol=1e-6)
        if "offdiag" in kind:
            assert np.abs(np.diag(dense)).max() < 1e-12
        # a sketch with the identity is the exact columns
        np.testing.assert_allclose(PredictionMatrix(probs, kind).points_sketch(np.eye(40)),
                                   exact.points_dense(progress=False), atol=1e-4)


def test_overlap_grows_groups_to_size_and_counts_coverage(planted):
    result = cluster_classes(planted.probs, 20, seed=0, size=9, progress=False)
    for group, core in zip(result.groups, result.cores):
        assert len(group) == max(9, len(core))
        assert len(set(group.tolist())) == len(group)
        np.testing.assert_array_equal(group[: len(core)], core)   # k-means members come first
    counts = np.zeros(120, dtype=int)
    for group in result.groups:
        counts[group] += 1
    expected = {str(n): int((counts == n).sum()) for n in range(counts.max() + 1)}
    assert result.coverage["histogram"] == expected
    assert sum(expected.values()) == 120 and int(expected.get("2", 0)) + int(expected.get("3", 0)) > 0
    # the classes added to a group are ones it covaries with most: mostly the group's own mates
    # when k-means merged or split a planted group, otherwise at least positively covarying
    cov = PredictionMatrix(planted.probs, "covariance").covariance_dense(progress=False)
    for group, core in zip(result.groups, result.cores):
        added = group[len(core):]
        outside = np.setdiff1d(np.arange(120), group)
        if len(added) and len(outside):
            assert cov[np.ix_(added, core)].sum(1).min() >= cov[np.ix_(outside, core)].sum(1).max() - 1e-12


def test_min_size_drops_small_groups_and_coverage_histogram():
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    groups = groups_from_labels(labels, 5)               # cluster 4 is empty
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    kept, dropped = drop_small(groups, 3)
    assert dropped == 2 and [g.tolist() for g in kept] == [[0, 1, 2], [6, 7, 8, 9]]
    cov = coverage([np.array([0, 1, 2]), np.array([2, 3]), np.array([2, 4])], 6)
    assert cov["histogram"] == {"0": 1, "1": 4, "2": 0, "3": 1}
    assert cov["uncovered"] == 1 and cov["max_groups_per_class"] == 3
    with pytest.raises(Exception, match="min_size"):
        cluster_classes(make_synthetic_predictions(12, 400, 3, dense=True).probs, 12, min_size=2,
                        progress=False)


def test_max_size_leaves_the_classes_the_generalist_never_confuses_with_it(planted):
    """A giant group is what k-means makes of classes whose held-out rows are one-hot (no confusion
    signal): 60 such classes beside the 20 planted groups of 6 form one group of 60; clustering.max_size
    drops it (those classes stay with the generalist) and keeps every planted group."""
    extra = 60
    sure = np.zeros((extra * 10, 120 + extra), np.float32)
    sure[np.arange(extra * 10), 120 + np.repeat(np.arange(extra), 10)] = 1.0
    probs = np.vstack([np.hstack([planted.probs, np.zeros((len(planted.probs), extra), np.float32)]), sure])
    loose = cluster_classes(probs, 21, backend="sklearn", seed=0, progress=False)
    assert max(len(g) for g in loose.groups) == extra and loose.dropped_large == 0
    guarded = cluster_classes(probs, 21, backend="sklearn", seed=0, progress=False, max_size=30)
    assert guarded.dropped_large == 1
    planted_groups = sorted(tuple(np.flatnonzero(planted.group_of == g)) for g in range(20))
    assert sorted(tuple(sorted(g)) for g in guarded.groups) == planted_groups
    with pytest.raises(Exception, match="max_size"):
        cluster_classes(probs, 21, backend="sklearn", seed=0, progress=False, max_size=3)


def test_temperature_finds_the_groups_of_a_sharp_generalist(planted):
    """A well-trained generalist: the planted rows raised to the power 8 and renormalised (the logits
    times 8, the same top-1 on every row). Its second choices sit so far below the first that k-means
    makes one giant group and the planted groups are lost; softening at T = 8 gives them back, dense or
    top-k, and a softened row is still a probability row with the same top class."""
    sharp = soften(planted.probs, 1 / 8)
    assert (sharp.argmax(1) == planted.probs.argmax(1)).all() and sharp.max(1).mean() > 0.95
    raw = cluster_classes(sharp, 20, backend="sklearn", seed=0, progress=False)
    assert adjusted_rand_score(planted.group_of, raw.labels) < 0.5 and max(len(g) for g in raw.groups) > 20
    soft = soften(sharp, 8)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    assert (soft.argmax(1) == sharp.argmax(1)).all()
    found = cluster_classes(soft, 20, backend="sklearn", seed=0, progress=False)
    assert adjusted_rand_score(planted.group_of, found.labels) >= 0.9
    top = check_sparse(sp.csr_matrix(sharp), "s", top_k=8)
    soft_top = soften(top, 8)
    assert sp.issparse(soft_top) and soft_top.nnz == top.nnz
    np.testing.assert_allclose(np.asarray(soft_top.sum(1)).ravel(), 1.0, atol=1e-5)
    found_top = cluster_classes(soft_top, 20, backend="sklearn", seed=0, progress=False)
    assert adjusted_rand_score(planted.group_of, found_top.labels) >= 0.9
    assert soften(sharp, 1.0) is sharp


def test_log_probabilities_detected_and_equivalent(planted):
    probs, was_log = check_dense(planted.probs, "p", progress=False)
    log_probs, was_log2 = check_dense(np.log(planted.probs), "lp", progress=False)
    assert not was_log and was_log2
    np.testing.assert_allclose(log_probs, probs, rtol=1e-5, atol=1e-7)
    top, _ = check_dense(np.log(planted.probs), "lp", top_k=3, progress=False)
    expected = np.sort(planted.probs, axis=1)[:, -3:].sum(1)
    np.testing.assert_allclose(np.asarray(top.sum(1)).ravel(), expected, rtol=1e-5)
    cut = check_sparse(sp.csr_matrix(planted.probs), "s", top_k=3)
    np.testing.assert_allclose(cut.toarray(), top.toarray(), rtol=1e-5)
    # log(0) = -inf is a valid log-probability (probability zero), unlike NaN or +inf
    with_zero = np.log(planted.probs[:50])
    with_zero[0, np.argmin(with_zero[0])] = -np.inf
    probs_back, was_log = check_dense(with_zero, "lz", progress=False)
    assert was_log and probs_back[0].min() == 0.0


# ---------------------------------------------------------------------------------------- the CLI


def make_run_dir(tmp_path, num_classes=60, examples=True):
    """A finished generalist stage: log-probabilities, class names, one image per class."""
    synth = make_synthetic_predictions(num_classes, num_classes * 40, 5, mates_per_row=3, dense=True, seed=0)
    run = tmp_path / "run"
    write_npy(run / "generalist" / "preds-val.npy", np.log(np.maximum(synth.probs, 1e-30)))
    write_json(run / "generalist" / "meta.json",
               {"class_names": [f"cls{i}" for i in range(num_classes)], "num_classes": num_classes})
    if examples:
        images = np.zeros((num_classes, 12, 12), dtype=np.uint8)
        images[np.arange(num_classes), synth.group_of % 12, :] = 255
        write_npy(run / "generalist" / "class-examples.npy", images)
    mark_done(run, "generalist", stage_hash(Config(run_dir=str(run)), "generalist"))
    return run, synth


def test_cli_end_to_end_on_a_run_directory(tmp_path, capsys):
    run, synth = make_run_dir(tmp_path)
    main(["--k", "12", "--run-dir", str(run), "--size", "7", "--backend", "faiss"])
    out = run / "clustering"
    for name in ("clusters.json", "covariance.png", "groups.png", "done.json"):
        assert (out / name).stat().st_size > 0, name
    clusters = json.loads((out / "clusters.json").read_text())
    assert clusters["num_classes"] == 60 and clusters["params"]["backend"] == "faiss"
    assert all(len(g["classes"]) == 7 and g["names"] == [f"cls{c}" for c in g["classes"]]
               for g in clusters["groups"])
    assert sum(clusters["coverage"]["histogram"].values()) == 60
    assert set(clusters["timings"]) >= {"load_s", "matrix_s", "kmeans_s", "total_s"}
    assert clusters["input"]["log_probabilities"] is True
    core = np.full(60, -1)
    for g in clusters["groups"]:
        core[g["classes"][: g["num_core"]]] = g["id"]
    assert adjusted_rand_score(synth.group_of, core) >= 0.9
    assert (run / "config.yaml").exists()      # the resolved config, with the clustering flags
    capsys.readouterr()
    main(["--run-dir", str(run)])             # same config (read from the run) -> skipped
    assert "already done" in capsys.readouterr().out
    main(["--run-dir", str(run), "--k", "10"])  # a changed flag redoes the stage
    assert len(json.loads((out / "clusters.json").read_text())["groups"]) <= 10
    main(["--run-dir", str(run), "--temperature", "2"])
    assert json.loads((out / "clusters.json").read_text())["params"]["temperature"] == 2.0
    assert "softened at T=2" in capsys.readouterr().out


def test_cli_with_own_probabilities_file_and_names(tmp_path, planted):
    probs = tmp_path / "probs.npy"
    np.save(probs, planted.probs)
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"n{i}" for i in range(120)]))
    run = tmp_path / "out"
    main(["--k", "20", "--probs", str(probs), "--names", str(names), "--run-dir", str(run)])
    first = json.loads((run / "clustering" / "clusters.json").read_text())
    assert first["class_names"][5] == "n5" and first["input"]["log_probabilities"] is False
    # the same predictions as a top-k sparse store and as log-probabilities give the same groups
    npz = tmp_path / "probs.npz"
    sp.save_npz(npz, sp.csr_matrix(planted.probs))
    main(["--k", "20", "--probs", str(npz), "--run-dir", str(tmp_path / "out2")])
    second = json.loads((tmp_path / "out2" / "clustering" / "clusters.json").read_text())
    assert [g["classes"] for g in second["groups"]] == [g["classes"] for g in first["groups"]]
    assert second["class_names"][5] == "class 5"


def _bad_inputs(planted):
    good = planted.probs[:200]
    unnormalised = good.copy()
    unnormalised[3] *= 0.5
    with_nan = good.copy()
    with_nan[7, 2] = np.nan
    with_inf = np.log(good)
    with_inf[9, 1] = np.inf
    return {
        "k larger than classes": (good, ["--k", "121"], "larger than the number of classes"),
        "1-D": (good[0], ["--k", "3"], "expected [N, K]"),
        "3-D": (good.reshape(2, 100, 120), ["--k", "3"], "expected [N, K]"),
        "rows not summing to one": (unnormalised, ["--k", "3"], "row 3"),
        "NaN": (with_nan, ["--k", "3"], "NaN or inf"),
        "inf": (with_inf, ["--k", "3"], "NaN or inf"),
        "logits": (good * 5, ["--k", "3"], "not logits"),
        "names of the wrong length": (good, ["--k", "3", "--names", "NAMES"], "class names"),
    }


@pytest.mark.parametrize("case", ["k larger than classes", "1-D", "3-D", "rows not summing to one", "NaN",
                                  "inf", "logits", "names of the wrong length"])
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, planted, capsys, case):
    array, flags, message = _bad_inputs(planted)[case]
    probs = tmp_path / "bad.npy"
    np.save(probs, array)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b"]))
    run = tmp_path / "run"
    flags = [str(names) if f == "NAMES" else f for f in flags]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--probs", str(probs), "--run-dir", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not run.exists()


def test_bad_k_for_a_run_directory_leaves_the_previous_result(tmp_path, capsys):
    run, _ = make_run_dir(tmp_path, examples=False)
    main(["--k", "12", "--run-dir", str(run)])
    before = {p.name: p.read_bytes() for p in (run / "clustering").iterdir()}
    with pytest.raises(SystemExit):
        main(["--k", "61", "--run-dir", str(run)])
    assert "larger than the number of classes" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "clustering").iterdir()} == before


def test_faiss_missing_or_cpu_only_says_so_and_still_clusters(planted, monkeypatch, capsys):
    from clustering import kmeans

    def groups(backend):
        return cluster_classes(planted.probs, 20, backend=backend, seed=0, progress=False).labels

    reference = groups("sklearn")
    monkeypatch.setattr(kmeans, "faiss_installed", lambda: False)
    missing = groups("faiss")
    line = capsys.readouterr().err.strip()
    assert "faiss is not installed" in line and "specdistill[cpu]" in line and "\n" not in line
    assert (missing == reference).all()   # it really ran scikit-learn's KMeans
    monkeypatch.setattr(kmeans, "faiss_installed", lambda: True)
    monkeypatch.setattr(kmeans, "_cuda_visible", lambda: True)   # a GPU machine with faiss-cpu installed
    cpu = groups("faiss")
    line = capsys.readouterr().err.strip()
    assert "no GPU support" in line and "specdistill[gpu]" in line and "\n" not in line
    assert adjusted_rand_score(planted.group_of, cpu) >= 0.9
