import json

import numpy as np
import pytest
import torch

from specdistill.config import ModelConfig, TrainConfig
from specdistill.data.loading import BatchAugment, train_loader
from specdistill.engine import CHECKPOINT, METRICS, fit, lr_factor, predict_log_probs
from specdistill.errors import SpecdistillError
from specdistill.models import build_model


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(depth=8, width=8), 10, 1, 16)


def test_engine_learns_and_writes_metrics(tiny_splits, tmp_path):
    train, val = tiny_splits
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    result = fit(_model(), train_loader(train, 32), val, cfg, tmp_path, progress=False)
    assert result["best_val_acc"] > 0.5  # chance is 0.1
    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"train_loss", "val_acc", "images_per_s", "lr", "train_ce"} <= set(lines[0])
    log_probs = predict_log_probs(_model(), val.images)
    assert log_probs.shape == (len(val), 10) and np.allclose(np.exp(log_probs).sum(1), 1, atol=1e-5)


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tiny_splits, tmp_path):
    train, val = tiny_splits
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    reference = _model()
    fit(reference, train_loader(train, 32), val, cfg, tmp_path / "ref", augment=BatchAugment(), progress=False)

    calls = {"n": 0}
    steps_per_epoch = len(train) // 32

    def dies_in_epoch_two(model, images, labels, index):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch + 3:
            raise _Interrupt  # the process is killed mid-epoch
        logits = model(images)
        return logits, {"ce": torch.nn.functional.cross_entropy(logits, labels)}

    with pytest.raises(_Interrupt):
        fit(_model(), train_loader(train, 32), val, cfg, tmp_path / "run", objective=dies_in_epoch_two,
            augment=BatchAugment(), progress=False)
    assert (tmp_path / "run" / CHECKPOINT).exists()  # epoch 1 was saved
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    result = fit(resumed, train_loader(train, 32), val, cfg, tmp_path / "run", augment=BatchAugment(),
                 progress=False)
    assert result["epochs_run"] == 3
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_early_stopping_and_best_weights(tiny_splits, tmp_path):
    train, val = tiny_splits
    cfg = TrainConfig(epochs=30, batch_size=32, lr=0.05, patience=2)
    result = fit(_model(), train_loader(train, 32), val, cfg, tmp_path, progress=False)
    assert result["stopped_early"] and result["epochs_run"] < 30
    assert result["best_epoch"] == result["epochs_run"] - 2


def test_truncated_or_foreign_checkpoint_is_one_clear_error(tiny_splits, tmp_path):
    train, val = tiny_splits
    cfg = TrainConfig(epochs=1, batch_size=32)
    fit(_model(), train_loader(train, 32), val, cfg, tmp_path, progress=False)
    with pytest.raises(SpecdistillError, match="different model or training config"):
        fit(_model(), train_loader(train, 32), val, TrainConfig(epochs=2, batch_size=64), tmp_path, progress=False)
    ckpt = tmp_path / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(SpecdistillError, match="corrupt or truncated"):
        fit(_model(), train_loader(train, 32), val, cfg, tmp_path, progress=False)


def test_diverging_loss_stops_with_a_hint(tiny_splits):
    train, val = tiny_splits

    def nan_loss(model, images, labels, index):
        logits = model(images)
        return logits, {"ce": logits.sum() * float("nan")}

    with pytest.raises(SpecdistillError, match="lower the learning rate"):
        fit(_model(), train_loader(train, 32), val, TrainConfig(epochs=1), objective=nan_loss, progress=False)


def test_schedule_warms_up_and_decays():
    cfg = TrainConfig(schedule="cosine", warmup_epochs=1)
    factors = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] < 0.01 and all(a >= b for a, b in zip(factors[10:], factors[11:]))
