"""benchmarks/compare_runs.py: systems of different runs compared on the same examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from specdistill.config import load_config
from specdistill.data import load_data

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


def _script():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_hot(labels: np.ndarray, wrong: np.ndarray, num_classes: int) -> np.ndarray:
    top = labels.copy()
    top[wrong] = (labels[wrong] + 1) % num_classes
    return np.log(np.eye(num_classes, dtype=np.float32)[top] * 0.9 + 0.1 / num_classes)


def _wrong_masks(labels: np.ndarray, a: slice, b: slice) -> tuple[np.ndarray, np.ndarray]:
    """Two systems' wrong examples: ``a`` and ``b`` are the rows each gets wrong."""
    a_wrong, b_wrong = np.zeros(len(labels), bool), np.zeros(len(labels), bool)
    a_wrong[a], b_wrong[b] = True, True
    return a_wrong, b_wrong


def test_counts_what_only_each_system_gets_right(tmp_path, capsys):
    cfg = load_config(TINY)
    dataset = load_data(cfg.data, cfg.seed)
    k = cfg.data.num_classes
    for split in ("val", "test"):
        labels = np.asarray(dataset.split(split).labels)
        a_wrong, b_wrong = _wrong_masks(labels, slice(0, 10), slice(7, 40))   # B misses 3 of A's 10 and 30 others
        np.save(tmp_path / f"a-{split}.npy", _one_hot(labels, a_wrong, k))
        np.save(tmp_path / f"b-{split}.npy", _one_hot(labels, b_wrong, k))
    _script().main([TINY, f"A={tmp_path}/a-{{split}}.npy", f"B={tmp_path}/b-{{split}}.npy"])
    out = capsys.readouterr().out
    n_val = len(dataset.split("val").labels)
    assert f"| A | {1 - 10 / n_val:.2%} |" in out
    assert out.count("| B | 30 / 7 (p = ") == 1 and "p = 0.000" in out.split("| B | 30 / 7")[1]
    # per fold: A's ten wrong rows are the first of their classes in stored order, so they fall in fold 1
    from combine.choices import fold_ids

    _script().main([TINY, f"A={tmp_path}/a-{{split}}.npy", f"B={tmp_path}/b-{{split}}.npy", "--folds", "2"])
    out = capsys.readouterr().out
    folds = fold_ids(np.asarray(dataset.split("val").labels), 2)
    wrong_in_first = int((folds[:10] == 0).sum())
    first = int((folds == 0).sum())
    assert f"held-out fold 1 ({first})" in out
    assert f"| A | {1 - wrong_in_first / first:.2%} | {1 - (10 - wrong_in_first) / (n_val - first):.2%} |" in out


def test_a_file_of_another_run_size_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "x-val.npy", np.zeros((5, 24), np.float32))
    np.save(tmp_path / "x-test.npy", np.zeros((5, 24), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        _script().main([TINY, f"X={tmp_path}/x-{{split}}.npy"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5 val predictions" in err[0] and "same data" in err[0]


def _rows(labels: np.ndarray, unsure_wrong: np.ndarray, num_classes: int) -> np.ndarray:
    """Log-probabilities: 0.9 on the label, or 0.55 on the next class and 0.45 on the label."""
    probs = np.full((len(labels), num_classes), 1e-6, np.float32)
    probs[np.arange(len(labels)), labels] = 0.9
    wrong = np.flatnonzero(unsure_wrong)
    probs[wrong, labels[wrong]] = 0.45
    probs[wrong, (labels[wrong] + 1) % num_classes] = 0.55
    return np.log(probs / probs.sum(1, keepdims=True))


def test_a_sum_of_paths_is_the_mean_of_their_probabilities_and_top_k_files_are_read(tmp_path, capsys):
    from specdistill.predictions import write_predictions

    cfg = load_config(TINY)
    dataset = load_data(cfg.data, cfg.seed)
    k = cfg.data.num_classes
    for split in ("val", "test"):
        labels = np.asarray(dataset.split(split).labels)
        n = len(labels)
        # unsure and wrong; the other is sure and right there, except on 15..19
        a_wrong, b_wrong = _wrong_masks(labels, slice(0, 20), slice(15, 40))
        np.save(tmp_path / f"a-{split}.npy", _rows(labels, a_wrong, k))
        write_predictions(tmp_path / "b", split, [_rows(labels, b_wrong, k)], n, k, "topk", 3)
    assert (tmp_path / "b" / "preds-val-topk.npz").exists()
    _script().main([TINY, f"A={tmp_path}/a-{{split}}.npy", f"B={tmp_path}/b/preds-{{split}}-topk.npz",
                    f"A and B={tmp_path}/a-{{split}}.npy+{tmp_path}/b/preds-{{split}}-topk.npz"])
    out = capsys.readouterr().out
    n_test = len(dataset.split("test").labels)
    assert f"| B | {1 - 25 / len(dataset.split('val').labels):.2%} |" in out
    assert f"| A and B | {1 - 5 / len(dataset.split('val').labels):.2%} | {1 - 5 / n_test:.2%} |" in out
    # A against the pair: the pair is right on the 15 A misses that B gets, wrong on none A gets right
    assert out.count("| A and B | 0 / 15 (p = ") == 1


def test_parts_of_another_class_count_are_one_line(tmp_path, capsys):
    cfg = load_config(TINY)
    dataset = load_data(cfg.data, cfg.seed)
    for split in ("val", "test"):
        n = len(dataset.split(split).labels)
        np.save(tmp_path / f"x-{split}.npy", np.zeros((n, cfg.data.num_classes + 1), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        _script().main([TINY, f"X={tmp_path}/x-{{split}}.npy"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"over {cfg.data.num_classes + 1} classes" in err[0]
