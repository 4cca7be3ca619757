"""The paper-experiment code paths (paper/) at a tiny size: every experiment runs, is
deterministic for a seed, makes its choices on held-out data only, and reuses saved models."""

import numpy as np
import pytest
import torch

from paper.experiments import choose_bias
from paper.lab import Lab, Regulariser, RepeatedSampler, choose
from paper.run import EXPERIMENT_ORDER, run_experiments
from paper.transfer import munge, shift, small_subset
from specdistill.config import load_config
from specdistill.data import Dataset, Split
from specdistill.errors import SpecdistillError

TINY = [
    "data.source=fashion-mnist",
    "generalist.model={name: mlp, hidden: [48, 48], dropout: 0.5}",
    "generalist.train={epochs: 2, batch_size: 64, optimizer: adamw, lr: 0.003, weight_decay: 0.0}",
    "student.model={name: mlp, hidden: [24, 24]}",
    "student.train={epochs: 2, batch_size: 64, optimizer: adamw, lr: 0.003, weight_decay: 0.0}",
    "student.loss={name: hinton, temperature: 4.0, alpha: 0.9}",
    "paper={alphas: [0.5, 1.0], temperatures: [1.0, 4.0], widths: [8, 16], bias_max: 4.0, bias_step: 0.5, "
    "small_fraction: 0.2, small_repeats: 2, synthetic_copies: 2, "
    "small_train: {epochs: 2, batch_size: 32, optimizer: adamw, lr: 0.003, weight_decay: 0.0}}",
]


def blobs(n: int, rng: np.random.Generator) -> Split:
    """10 classes of 14x14 images, each class a bright block in its own place, plus noise."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = (rng.random((n, 14, 14)) * 90).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 5)
        images[i, 2 + 6 * r:6 + 6 * r, 1 + 2 * c + rng.integers(0, 2):3 + 2 * c] = 255
    return Split(images, labels)


@pytest.fixture
def dataset() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset("blobs", [f"c{i}" for i in range(10)], blobs(300, rng), blobs(200, rng), blobs(200, rng))


def test_every_experiment_runs_is_deterministic_and_chooses_on_held_out_data(dataset, tmp_path):
    cfg = load_config(None, TINY)
    first = Lab(cfg, dataset, tmp_path, device="cpu")
    results = {r.name: r for r in run_experiments(first, EXPERIMENT_ORDER)}
    assert list(results) == list(EXPERIMENT_ORDER)
    # gap 1+1+2, temperature 2x(1+2), missing 1, small data 1+2, synthetic 1+1+2x2: each model once
    assert first.trained == 20 and first.loaded == 0
    for result in results.values():
        assert result.title in result.markdown() and "|---|" in result.markdown()

    gap = results["gap"].data
    assert gap["alpha"] == min([0.5, 1.0], key=lambda a: gap["alpha_val_errors"][str(a)])
    h, d, large = gap["hard"]["test_errors"], gap["distilled"]["test_errors"], gap["large"]["test_errors"]
    assert gap["gap_closed"] == (pytest.approx((h - d) / (h - large)) if h > large else None)
    for width in results["temperature"].data["widths"].values():
        val = {float(t): r["val_errors"] for t, r in width["runs"].items()}
        assert val[width["chosen_t"]] == min(val.values())
    missing = results["missing-class"].data
    assert missing["bias"] in np.arange(0, 4.01, 0.5)
    assert missing["class_errors_before"] <= missing["class_test_examples"]
    synthetic = results["synthetic-transfer"].data
    assert synthetic["small_examples"] == 60 and synthetic["synthetic_examples"] == 120

    # Same seed, no saved models, the test labels scrambled: the same models and the same choices,
    # because nothing is chosen on the test split.
    scrambled = Dataset(dataset.name, dataset.class_names, dataset.train, dataset.val,
                        Split(dataset.test.images, np.roll(dataset.test.labels, 7)))
    again = {r.name: r.data for r in run_experiments(Lab(cfg, scrambled, None, device="cpu"), EXPERIMENT_ORDER)}

    def held_out(tree):
        if isinstance(tree, dict):
            return {k: held_out(v) for k, v in tree.items() if "test" not in k and k != "gap_closed"}
        return tree

    assert held_out(again) == held_out({n: r.data for n, r in results.items()})

    # A second lab over the same work directory loads every model and reproduces every number.
    reloaded = Lab(cfg, dataset, tmp_path, device="cpu")
    assert [r.data for r in run_experiments(reloaded, EXPERIMENT_ORDER)] == [r.data for r in results.values()]
    assert reloaded.trained == 0 and reloaded.loaded == first.trained


def test_missing_class_leaves_the_class_out_of_the_transfer_set(dataset):
    lab = Lab(load_config(None, TINY), dataset, None, device="cpu")
    seen = []
    original = lab.train

    def spy(name, model_cfg, split, *args, **kwargs):
        seen.append((name, set(split.labels.tolist())))
        return original(name, model_cfg, split, *args, **kwargs)

    lab.train = spy
    run_experiments(lab, ["missing-class"])
    without = [labels for name, labels in seen if "without" in name]
    assert without == [set(range(10)) - {3}]


def test_bad_settings_are_one_line_errors(dataset):
    with pytest.raises(SpecdistillError, match="no 'paper' section"):
        Lab(load_config(None, TINY[:-1]), dataset)
    with pytest.raises(SpecdistillError, match="missing_class=12"):
        run_experiments(Lab(load_config(None, TINY + ["paper.missing_class=12"]), dataset), ["missing-class"])
    with pytest.raises(SpecdistillError, match="small_fraction"):
        small_subset(Lab(load_config(None, TINY + ["paper.small_fraction=0.01"]), dataset))


def test_small_subset_is_stratified_and_fixed_by_the_seed(dataset):
    lab = Lab(load_config(None, TINY), dataset)
    a, b = small_subset(lab), small_subset(lab)
    assert len(a) == 60 and np.array_equal(a.images, b.images)
    assert np.bincount(a.labels, minlength=10).tolist() == [6] * 10
    other = small_subset(Lab(load_config(None, TINY + ["seed=1"]), dataset))
    assert not np.array_equal(a.images, other.images)


def test_munge_resamples_towards_the_nearest_neighbour():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 6, 6), dtype=np.uint8)
    images[1] = images[0] // 2 + 1          # 0 and 1 are each other's nearest neighbours
    assert np.array_equal(munge(images, 3, p=0.0, s=2.0), np.tile(images, (3, 1, 1)))
    swapped = munge(images, 2, p=1.0, s=1e9)  # every pixel taken from the neighbour, no spread
    assert swapped.shape == (24, 6, 6) and swapped.dtype == np.uint8
    assert np.array_equal(swapped[0], images[1]) and np.array_equal(swapped[1], images[0])
    half = munge(images, 4, p=0.5, s=2.0, seed=3)
    assert np.array_equal(half, munge(images, 4, p=0.5, s=2.0, seed=3))
    changed = (half.reshape(4, 12, -1) != images.reshape(1, 12, -1)).mean()
    assert 0.3 < changed < 0.55


def test_shift_moves_whole_images_within_the_bound():
    images = np.zeros((200, 9, 9), np.uint8)
    images[:, 4, 4] = 200
    moved = shift(images, 2, np.random.default_rng(0))
    rows, cols = np.nonzero(moved.reshape(200, 9, 9).max(axis=0))
    assert moved.sum() == images.sum()
    assert set(rows) == set(cols) == {2, 3, 4, 5, 6}   # every offset in [-2, 2] occurs


def test_regulariser_keeps_the_expected_input_and_is_seeded():
    x = torch.rand(64, 1, 14, 14) * 2 - 1
    assert torch.equal(Regulariser(0.0, 0.0, 14)(x), x)
    drop = Regulariser(0.0, 0.2, 14)
    out = drop(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, drop(x, torch.Generator().manual_seed(0)))
    dropped = out == -1
    assert 0.15 < dropped.float().mean() < 0.25
    assert torch.allclose(((out + 1) * (1 - 0.2))[~dropped], (x + 1)[~dropped], atol=1e-5)
    jittered = Regulariser(2.0, 0.0, 14)(x, torch.Generator().manual_seed(0))
    assert jittered.shape == x.shape and not torch.equal(jittered, x)


def test_repeated_sampler_covers_each_example_repeats_times():
    sampler = RepeatedSampler(10, 3, batch_size=5, seed=0)
    seen = np.concatenate(list(sampler))
    assert len(sampler) == 6 and np.bincount(seen).tolist() == [3] * 10
    sampler.set_epoch(1)
    assert not np.array_equal(seen, np.concatenate(list(sampler)))


def test_choose_bias_and_choose_use_held_out_numbers():
    labels = np.array([0, 1, 2, 2, 2, 1])
    logits = torch.zeros(6, 3)
    logits[np.arange(6), labels] = 1.0
    logits[:, 2] -= 1.6                     # class 2 is under-scored: needs a bias above 0.6
    assert choose_bias(logits, labels, 2, np.arange(0, 3.01, 0.5)) == 1.0   # smallest bias with no errors

    class R:
        def __init__(self, errors, loss):
            self.val_errors, self.val_loss = errors, loss

    assert choose({0.5: R(10, 0.3), 0.9: R(8, 0.4), 1.0: R(8, 0.2)}) == 1.0


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_paper_fmnist.py"
    spec = importlib.util.spec_from_file_location("bench_paper_fmnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_command_runs_an_experiment_on_fashion_mnist(capsys):
    tiny = [arg for override in TINY[1:] + ["data.limit=300"] for arg in ("--set", override)]
    _bench().main(["--experiment", "gap", "--no-cache", "--threads", "1", *tiny])
    out = capsys.readouterr().out
    assert "### 1. Distillation closes the gap" in out and "test errors (of 300)" in out
    assert "fashion-mnist, 300 train / 300 held-out / 300 test" in out


def test_bench_command_reports_bad_settings_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench().main(["--experiment", "missing-class", "--no-cache", "--set", "paper.missing_class=12",
                       "--set", "data.limit=300"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "paper.missing_class=12" in err[0]
