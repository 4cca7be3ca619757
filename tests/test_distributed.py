"""Data-parallel training through Ray Train (``train.workers > 1``): two CPU workers (gloo) on an
embedded Ray, the same files as single-process ``fit``, and a worker killed mid-run that Ray Train
restarts from the last epoch's checkpoint. Each Ray Train start costs tens of seconds on two shared
cores, so one run checks all of it, with the student stage's objective (a distiller over cached
teacher targets) to show that it travels to the workers."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from specdistill.artifacts import load_weights
from specdistill.config import ModelConfig, StudentLossConfig, TrainConfig, stage_hash, validate_config
from specdistill.data.loading import EpochBatchSampler, train_loader
from specdistill.distributed import RAY_STORAGE, ShardedBatches, shard_loader
from specdistill.engine import CHECKPOINT, METRICS, fit
from specdistill.errors import SpecdistillError
from specdistill.models import build_model


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mlp", hidden=[64]), 10, 1, 16)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # one actor process fewer to start on two shared cores; it only watches for node preemption
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def _records(folder):
    return [json.loads(line) for line in (folder / METRICS).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Each worker's share of the batches (no Ray)


def test_shares_partition_every_batch_and_reshuffle_per_epoch(tiny_splits):
    train, _ = tiny_splits
    whole = train_loader(train, 32, seed=3)
    shards = [shard_loader(whole, rank, 2) for rank in range(2)]
    for epoch in (0, 1):
        for loader in (whole, *shards):
            loader.sampler.set_epoch(epoch)
        for (_, labels, index), *parts in zip(whole, *shards):
            assert [len(p[2]) for p in parts] == [16, 16]
            assert torch.equal(torch.cat([p[2] for p in parts]), index)        # the same global batch
            assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    assert len(shards[0]) == len(whole) == 300 // 32


def test_small_batches_are_skipped_by_every_worker_and_wrappers_keep_their_place():
    class Tagged(torch.utils.data.Sampler):   # the streaming loader's shape: re-yields (epoch, batch)
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return ((7, b) for b in self.batches)

        def __len__(self):
            return len(self.batches)

    sampler = EpochBatchSampler(10, 4, shuffle=False)   # batches of 4, 4, 2
    shares = [list(ShardedBatches(sampler, r, 3)) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]                   # the batch of 2 < 3 workers: skipped
    assert sorted(np.concatenate([s[0] for s in shares]).tolist()) == [0, 1, 2, 3]
    loader = torch.utils.data.DataLoader(list(range(10)), sampler=Tagged(sampler), batch_size=None,
                                         collate_fn=lambda item: item)
    sharded = shard_loader(loader, 1, 2)
    assert isinstance(sharded.sampler, Tagged) and isinstance(sharded.sampler.batches, ShardedBatches)
    assert [(tag, list(b)) for tag, b in sharded.sampler] == [(7, [2, 3]), (7, [6, 7]), (7, [9])]


def test_workers_do_not_change_what_a_stage_produces():
    from student.train import StudentPlan, _run_folder

    one = validate_config({"generalist": {"train": {"workers": 1}}, "student": {"train": {"workers": 1}}})
    many = validate_config({"generalist": {"train": {"workers": 8, "use_gpu": True}},
                            "student": {"train": {"workers": 4}}})
    assert stage_hash(one, "student") == stage_hash(many, "student")
    plan = StudentPlan("student", "student", ModelConfig(), StudentLossConfig(), None)
    assert _run_folder(plan, "k", one, "d") == _run_folder(plan, "k", many, "d")
    changed = validate_config({"student": {"train": {"batch_size": 64}}})
    assert _run_folder(plan, "k", changed, "d") != _run_folder(plan, "k", one, "d")
    with pytest.raises(SpecdistillError, match="specialists.train.workers=2"):
        from specdistill.config import load_config

        load_config(None, ["specialists.train.workers=2"])


# ----------------------------------------------------------------------------------------------
# Two Ray Train workers


def _dies_once_in_epoch_two(objective, marker: str, calls: str, steps: int):
    """``objective``, counting its calls per worker in files, that kills worker 1's process (as an
    OOM kill or a lost node would) on its third step of epoch 2 while ``marker`` exists, once."""
    count = [0]

    def dies_once(model, images, labels, index):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        with open(f"{calls}-{rank}", "a") as f:
            f.write(".")
        count[0] += 1
        if rank == 1 and count[0] == steps + 3 and os.path.exists(marker):
            shutil.copy(os.path.join(os.path.dirname(marker), "run", METRICS), marker + ".metrics")
            os.remove(marker)
            os._exit(1)
        return objective(model, images, labels, index)

    return dies_once


def _student_objective(train, val):
    """The student stage's objective: a distiller over cached teacher targets (a bound method holding
    the cache, so it has to travel to the workers through the object store)."""
    from specdistill.kd import Distiller, loss_from_config
    from student.cache import build_cache
    from student.teachers import models_teacher

    teacher = _model(seed=1)
    fit(teacher, train_loader(train, 32), val, TrainConfig(epochs=2, batch_size=32, lr=0.05), progress=False)
    cache = build_cache(models_teacher([teacher], torch.device("cpu")), train.images, 5, "teacher", progress=False)
    return Distiller(_model(), loss_from_config(StudentLossConfig(alpha=0.5)), cache).objective


def test_two_workers_write_what_one_process_writes_and_resume_after_a_killed_worker(ray_local, tiny_splits,
                                                                                   tmp_path):
    """Generalist-style fit (resume, checkpoint, metrics) with the student's distillation objective."""
    train, val = tiny_splits
    steps = 300 // 32
    distil = _student_objective(train, val)
    single = TrainConfig(epochs=1, batch_size=32, lr=0.05)
    fit(_model(), train_loader(train, 32), val, single, tmp_path / "single", objective=distil, progress=False)

    marker = tmp_path / "kill-worker-1"
    marker.touch()
    objective = _dies_once_in_epoch_two(distil, str(marker), str(tmp_path / "calls"), steps)
    model = _model()
    two = single.model_copy(update={"epochs": 3, "workers": 2})
    result = fit(model, train_loader(train, 32), val, two, tmp_path / "run", objective=objective, progress=False)

    run = tmp_path / "run"
    # the worker was killed once, and Ray Train restarted the group
    assert not marker.exists()
    assert len((tmp_path / "calls-1").read_text()) == (steps + 3) + 2 * steps
    # the restarted group resumed after epoch 1 instead of redoing it: worker 0 ran epoch 1 once (and
    # at most three steps of the interrupted epoch 2), and epoch 1's record is the one written before
    assert 3 * steps <= len((tmp_path / "calls-0").read_text()) <= 3 * steps + 3
    before = [json.loads(line) for line in (tmp_path / "kill-worker-1.metrics").read_text().splitlines()]
    records = _records(run)
    assert [r["epoch"] for r in before] == [1] and records[0] == before[0]
    assert [r["epoch"] for r in records] == [1, 2, 3] and result["epochs_run"] == 3
    # the same files, keys and result as single-process fit
    assert set(records[0]) == set(_records(tmp_path / "single")[0]) >= {"train_kd", "train_ce", "val_acc"}
    tensors, meta = load_weights(run / CHECKPOINT)
    single_tensors, single_meta = load_weights(tmp_path / "single" / CHECKPOINT)
    assert set(tensors) == set(single_tensors) and set(meta["loop"]) == set(single_meta["loop"])
    assert result["history"] == records and result["best_epoch"] == meta["loop"]["best_epoch"]
    for name, value in model.state_dict().items():   # the best epoch's weights, back in the caller's model
        assert torch.equal(value, tensors[f"best.{name}"]), name
    assert records[-1]["val_acc"] > 0.3                       # learns (chance is 0.1)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert not (run / RAY_STORAGE).exists()                   # Ray Train's run folder is cleaned up

    # a finished run asks for no workers again; another config's checkpoint is refused before any start
    again = fit(_model(seed=5), train_loader(train, 32), val, two, run, objective=distil, progress=False)
    assert again["history"] == records
    with pytest.raises(SpecdistillError, match="different model or training config"):
        fit(_model(), train_loader(train, 32), val, two.model_copy(update={"lr": 0.1}), run, progress=False)


def test_a_failed_run_is_one_line_naming_the_bad_input_or_how_to_resume(tmp_path):
    from ray.train import WorkerGroupError

    from specdistill.distributed import _failure, _Job

    job = _Job(_model(), None, None, TrainConfig(), str(tmp_path), None, 0, "generalist", None, False, "")
    bad = SpecdistillError("generalist: the loss became nan at epoch 2 step 3; lower the learning rate")
    assert _failure(WorkerGroupError("x", {1: bad, 0: RuntimeError("gloo: connection closed")}), job, tmp_path) is bad
    lost = _failure(WorkerGroupError("x", {0: RuntimeError("Traceback\n...\nActorDiedError: node lost")}), job,
                    tmp_path)
    assert "ActorDiedError: node lost" in str(lost) and "run the same command again" in str(lost)
    assert len(str(lost).splitlines()) == 1


def test_asking_for_gpus_the_cluster_lacks_is_one_line(ray_local, tiny_splits, tmp_path):
    train, val = tiny_splits
    cfg = TrainConfig(epochs=1, batch_size=32, workers=2, use_gpu=True)
    with pytest.raises(SpecdistillError, match=r"needs 2 GPUs but the Ray cluster has 0"):
        fit(_model(), train_loader(train, 32), val, cfg, tmp_path, progress=False)
    with pytest.raises(SpecdistillError, match=r"needs 6 CPUs but the Ray cluster has 2"):
        fit(_model(), train_loader(train, 32), val, cfg.model_copy(update={"workers": 3, "num_threads": 2,
                                                                             "use_gpu": False}),
            tmp_path, progress=False)
