import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# every test (and every command it runs) starts its own embedded Ray unless it names a cluster: never
# join one that happens to run on this machine (a developer's, `make cluster-test`'s)
os.environ.setdefault("RAY_ADDRESS", "local")
torch.set_num_threads(2)


@pytest.fixture
def tiny_splits():
    """A learnable 10-class task: each class lights a different pixel block."""
    from specdistill.data import Split

    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 10, n)
    images = (rng.random((n, 16, 16)) * 60).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, (y // 5) * 8:(y // 5) * 8 + 8, (y % 5) * 3:(y % 5) * 3 + 3] = 255
    return Split(images[:300], labels[:300]), Split(images[300:], labels[300:])


@pytest.fixture
def tiny_combine_run(tmp_path, monkeypatch):
    """A run directory whose generalist and two specialists (untrained MLPs over 6 classes, groups
    {0, 1, 2} and {2, 3, 4, 5}) are done, on one 40-image split used as held-out and test."""
    from types import SimpleNamespace

    from specdistill import data as data_module
    from specdistill.config import Config, ModelConfig, stage_hash
    from specdistill.data import Dataset, Split
    from specdistill.models import build_model, save_classifier
    from specdistill.provenance import mark_done
    from specdistill.records import SpecialistInfo
    from specdistill.rundir import RunDir

    K, size = 6, 8
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 255, (40, size, size), dtype=np.uint8), rng.integers(0, K, 40))
    dataset = Dataset("tiny", [f"c{k}" for k in range(K)], split, split, split)
    monkeypatch.setattr(data_module, "load_data", lambda cfg, seed=0: dataset)

    run = tmp_path / "run"
    paths = RunDir.at(run)
    cfg = Config(run_dir=str(run))
    mcfg = ModelConfig(name="mlp", hidden=[16])
    meta = {"model": mcfg.model_dump(), "channels": 1, "image_size": size}
    torch.manual_seed(0)
    generalist = build_model(mcfg, K, 1, size)
    save_classifier(paths.generalist_weights, generalist, {**meta, "num_classes": K})
    mark_done(run, "generalist", stage_hash(cfg, "generalist"))
    groups, corrections = [[0, 1, 2], [2, 3, 4, 5]], [0.7, -0.3]
    spec_models = []
    for m, (classes, corr) in enumerate(zip(groups, corrections)):
        model = build_model(mcfg, len(classes) + 1, 1, size)
        save_classifier(paths.specialist_weights(m), model, {**meta, "num_classes": len(classes) + 1})
        SpecialistInfo(m, classes, [f"c{c}" for c in classes], corr).write(paths.specialist_info(m))
        spec_models.append(model)
    mark_done(run, "specialists", stage_hash(cfg, "specialists"), ids=[0, 1])
    return SimpleNamespace(cfg=cfg, run=run, paths=paths, dataset=dataset, generalist=generalist,
                           spec_models=spec_models, groups=groups, corrections=corrections)
