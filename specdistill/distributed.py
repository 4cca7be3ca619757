"""Data-parallel training on many devices: ``engine.fit`` through Ray Train (DDP) when ``train.workers > 1``.

Ray Train's ``TorchTrainer`` starts ``workers`` processes (one GPU each where the cluster has them;
gloo on CPU, NCCL on GPU), wraps the model in ``DistributedDataParallel`` and restarts the whole
group when a worker dies (``FailureConfig(max_failures=RESTARTS)``). Every worker runs the engine's
own steps (``train_one_epoch``, ``_keep_best``, ``_save_epoch``), so what comes out is what a single
process writes: ``checkpoint.safetensors`` and ``metrics.jsonl`` in the output folder, the same
keys, the same resume, the best held-out epoch restored into the caller's model.

How the work is split, and why so:

- **The global batch stays ``train.batch_size``.** Every worker iterates the caller's loader's
  batch sampler, reseeded per epoch exactly as one process does (so a resumed run sees the same
  batches), and keeps its contiguous share of each batch (``ShardedBatches``). DDP averages the
  workers' gradients, which for equal shares is the gradient of the whole batch, so the learning
  rate and the per-step schedule mean what they mean on one device. Ray's ``prepare_data_loader``
  (a ``DistributedSampler`` of examples) is not used: it would reshuffle with its own seed and make
  each worker's batch ``batch_size``.
- **Rank 0 judges and writes.** After each epoch's training (the workers' loss and accuracy sums
  all-reduced), rank 0 evaluates held-out accuracy, the record is broadcast so every worker takes
  the same early-stopping decision, rank 0 writes the checkpoint and metrics, and ``ray.train.report``
  (a barrier) holds every worker until they are on disk: a worker killed in epoch e+1 loses epoch
  e+1 only, and the restarted group resumes from epoch e's checkpoint.
- **Each worker draws its own dropout and augmentation** (streams seeded by seed, epoch and rank),
  and keeps its own batch-norm statistics (plain DDP, as torchvision's references without
  ``--sync-bn``); this is why ``workers`` changes the weights a little, like ``num_threads``.
- **Inputs go through the object store once** (``ray.put``): the model, the loader (with its
  in-memory arrays, or its file list for a streaming loader), the held-out split and the objective,
  which must therefore pickle (a closure or a bound method does; the student's distiller with its
  cached teacher targets does).
- **Storage.** The output folder holds the checkpoint and Ray Train's own run folder
  (``ray-train/``, removed after a finished fit), so on a cluster of several machines it must be on
  storage every worker sees (NFS, a mounted bucket), as Ray Train requires of ``storage_path``.
  Without an output folder a temporary one on this machine is used.

Ray is joined as the specialists join it (``specdistill.ray_connect``): ``RAY_ADDRESS``, a cluster
started on this machine, else an embedded Ray that is shut down afterwards.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from specdistill.artifacts import load_weights, write_text
from specdistill.config import TrainConfig
from specdistill.data import Split
from specdistill.engine import (
    CHECKPOINT,
    FitSetup,
    Objective,
    _fingerprint,
    _keep_best,
    _log_epoch,
    _prepare,
    _save_epoch,
    _start_or_resume,
    _steps_per_epoch,
    _summary,
    cross_entropy_objective,
    evaluate,
    foreign_checkpoint,
    resolve_device,
    train_one_epoch,
)
from specdistill.errors import SpecdistillError

RESTARTS = 3                   # how often Ray Train restarts the worker group after a worker died
RAY_STORAGE = "ray-train"      # Ray Train's run folder (storage_path), inside the output folder
STOPPED = "stopped.txt"        # in it: a bad input a worker met (one line), so a restart does not repeat it


# ----------------------------------------------------------------------------------------------
# Each worker's share of every batch


class ShardedBatches(Sampler):
    """This worker's contiguous share of each batch an inner batch sampler yields.

    A batch of n examples is cut at ``n * r // world``; batches smaller than ``world`` are skipped
    by every worker alike (DDP needs every worker to take every step). ``set_epoch`` reaches the
    inner sampler, so every worker reshuffles as one process would.
    """

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def set_epoch(self, epoch: int) -> None:
        for target in (self.batches, getattr(self.batches, "sampler", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
                return

    def __iter__(self):
        for batch in self.batches:
            n = len(batch)
            if n >= self.world:
                yield batch[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def __len__(self) -> int:
        return len(self.batches)


def shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """The same loader (its class, dataset, loader processes, collation) yielding worker ``rank``'s
    share of each batch."""
    if isinstance(loader.dataset, IterableDataset):
        raise SpecdistillError("train.workers > 1 needs a loader over a map-style dataset (batches drawn by "
                               "index), not an iterable one; set train.workers=1")
    options: dict[str, Any] = {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
                               "pin_memory": loader.pin_memory, "timeout": loader.timeout,
                               "worker_init_fn": loader.worker_init_fn}
    if loader.num_workers > 0:
        options.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                       multiprocessing_context=loader.multiprocessing_context)
    if loader.batch_size is None and loader.batch_sampler is None:   # a sampler of whole batches
        return type(loader)(loader.dataset, sampler=_sharded(loader.sampler, rank, world), batch_size=None,
                            **options)
    return type(loader)(loader.dataset, batch_sampler=_sharded(loader.batch_sampler, rank, world), **options)


def _sharded(batches: Any, rank: int, world: int) -> Any:
    """Share out the innermost sampler of index batches. A wrapper that re-yields another sampler's
    batches in its ``batches`` (the streaming loader tags each with its epoch) stays around the share."""
    inner = getattr(batches, "batches", None)
    if isinstance(inner, Sampler):
        wrapper = copy.copy(batches)
        wrapper.batches = _sharded(inner, rank, world)
        return wrapper
    return ShardedBatches(batches, rank, world)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    for part in (loader.batch_sampler, loader.sampler):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
            return


# ----------------------------------------------------------------------------------------------
# What every worker runs


@dataclass
class _Job:
    """Everything a worker needs, shipped through the object store once."""

    model: nn.Module
    loader: DataLoader
    val: Split | None
    cfg: TrainConfig
    out: str
    objective: Objective | None
    seed: int
    desc: str
    augment: nn.Module | None
    progress: bool
    fingerprint: str


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one worker's fit, resumed from the folder's checkpoint."""
    import ray

    job: _Job = ray.get(config["job"])
    stopped = Path(job.out) / RAY_STORAGE / STOPPED
    if stopped.exists():   # an earlier attempt met a bad input: end, the driver reports it
        return
    try:
        _worker_fit(job)
    except SpecdistillError as exc:
        write_text(stopped, str(exc))
        raise


def _worker_fit(job: _Job) -> None:
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero
    from ray.train.torch import get_device, prepare_model

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # the engine prints each epoch once (rank 0); Ray Train's own line per report and worker is noise
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    # held-out images come zero-copy (read-only) from the object store; the model only reads them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    cfg, out, model = job.cfg, Path(job.out), job.model
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    setup = FitSetup(cfg, get_device(), job.objective or cross_entropy_objective(cfg.label_smoothing),
                     _steps_per_epoch(job.loader, cfg, job.desc), job.augment, job.desc,
                     job.progress and rank == 0, rank, world)
    batches = shard_loader(job.loader, rank, world)
    opt, scaler = _prepare(model, setup)
    loop, best_state = _start_or_resume(out, model, opt, job.fingerprint, setup)
    parallel = prepare_model(model, move_to_device=False)   # DDP: the workers' gradients averaged each step
    while loop["epoch"] < cfg.epochs and not loop["stopped_early"]:
        _set_epoch(batches, loop["epoch"])
        record = train_one_epoch(parallel, batches, opt, scaler, setup, loop["epoch"], job.seed)
        if rank == 0 and job.val is not None and len(job.val):
            scores = evaluate(model, job.val, cfg.eval_batch_size, setup.device)
            record.update(val_loss=scores["loss"], val_acc=scores["acc"])
        record = broadcast_from_rank_zero(record)   # one record, so one early-stopping decision
        best_state = _keep_best(model, record, loop, best_state, cfg.patience)
        loop["history"].append(record)
        loop["epoch"] = record["epoch"]
        if rank == 0:
            _log_epoch(setup, record, loop["stopped_early"])
            _save_epoch(out, model, opt, best_state, loop)
        ray.train.report(record)   # a barrier: no worker starts the next epoch before this one is saved


# ----------------------------------------------------------------------------------------------
# The driver


def fit_distributed(model: nn.Module, train_batches: DataLoader, val: Split | None, cfg: TrainConfig,
                    out_dir: str | os.PathLike | None, objective: Objective | None, seed: int, desc: str,
                    device: torch.device | str | None, augment: nn.Module | None, progress: bool,
                    fingerprint: str) -> dict[str, Any]:
    """``engine.fit`` on ``cfg.workers`` Ray Train workers; same arguments, same result and files."""
    from specdistill.ray_connect import connect_ray

    device = resolve_device("auto") if device is None else torch.device(device)
    _steps_per_epoch(train_batches, cfg, desc)   # an empty split is one line here, not in every worker
    temporary = tempfile.TemporaryDirectory(prefix="specdistill-fit-") if out_dir is None else None
    out = Path(temporary.name if temporary else out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / RAY_STORAGE, ignore_errors=True)   # Ray Train's bookkeeping of an earlier, failed run
    job = _Job(model.cpu(), train_batches, val, cfg, str(out), objective, seed, desc, augment, progress,
               _fingerprint(model, cfg, fingerprint))
    if not _finished(out, job):
        # the dashboard serves the state API that Ray Train's placement-group cleaner polls
        started = connect_ray(None, dashboard=True)
        try:
            _run_trainer(job, out, progress)
        finally:
            if started:
                import ray

                ray.shutdown()
    tensors, meta = load_weights(out / CHECKPOINT)
    shutil.rmtree(out / RAY_STORAGE, ignore_errors=True)
    model.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    model.to(device).eval()
    if temporary:
        temporary.cleanup()
    return _summary(meta["loop"])


def _finished(out: Path, job: _Job) -> bool:
    """True when the folder holds this fit's checkpoint after its last epoch (no workers needed); one
    written for another model or config is refused here, before any worker starts."""
    if not (out / CHECKPOINT).exists():
        return False
    loop = load_weights(out / CHECKPOINT)[1].get("loop", {})
    if loop.get("fingerprint") != job.fingerprint:
        raise foreign_checkpoint(out / CHECKPOINT)
    return loop["epoch"] >= job.cfg.epochs or loop["stopped_early"]


def _scaling(cfg: TrainConfig, desc: str, progress: bool):
    """One worker per device: a GPU each where asked for (or, with "auto", where the cluster has one
    for each), else ``num_threads`` CPUs each (1 by default); refused at once when the cluster has
    too few, because Ray Train would otherwise wait for them."""
    import ray
    from ray.train import ScalingConfig

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0.0)), float(total.get("CPU", 0.0))
    use_gpu = gpus >= cfg.workers if cfg.use_gpu == "auto" else cfg.use_gpu
    threads = cfg.num_threads or 1
    if use_gpu and gpus < cfg.workers:
        raise SpecdistillError(f"train.workers={cfg.workers} with train.use_gpu=true needs {cfg.workers} GPUs but the "
                               f"Ray cluster has {gpus:g}; lower train.workers or set train.use_gpu=false")
    if cpus < cfg.workers * threads:
        raise SpecdistillError(f"train.workers={cfg.workers} x {threads} CPU each needs {cfg.workers * threads} CPUs "
                               f"but the Ray cluster has {cpus:g}; lower train.workers (or train.num_threads)")
    if progress:
        print(f"{desc}: data-parallel on {cfg.workers} Ray Train workers, "
              + ("one GPU each" if use_gpu else f"{threads} CPU each"), flush=True)
    return ScalingConfig(num_workers=cfg.workers, use_gpu=bool(use_gpu), resources_per_worker={"CPU": threads})


def _run_trainer(job: _Job, out: Path, progress: bool) -> None:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    # workers stay in the driver's working directory (Ray Train would move them into its run
    # folder), so a relative path means the same to every process
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"job": ray.put(job)},
        scaling_config=_scaling(job.cfg, job.desc, progress),
        run_config=RunConfig(name="fit", storage_path=str(out / RAY_STORAGE),
                             failure_config=FailureConfig(max_failures=RESTARTS),
                             logging_config=LoggingConfig(log_level="ERROR")))
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise _failure(exc, job, out) from None
    stopped = out / RAY_STORAGE / STOPPED
    if stopped.exists():
        raise SpecdistillError(stopped.read_text())


def _failure(exc: Exception, job: _Job, out: Path) -> SpecdistillError:
    """The one line for a failed run: a worker's own bad-input error as it is, else what broke."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    for failure in failures:
        if isinstance(failure, SpecdistillError):
            return failure
    stopped = out / RAY_STORAGE / STOPPED
    if stopped.exists():
        return SpecdistillError(stopped.read_text())
    lines = str(failures[0] if failures else exc).strip().splitlines()
    return SpecdistillError(
        f"{job.desc}: data-parallel training stopped after Ray Train's restarts ({lines[-1] if lines else exc!r}); "
        f"the last finished epoch is saved in {out}: run the same command again to resume from it")
