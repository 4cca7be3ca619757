"""Stage 3: one Ray task per specialist, the driver owning progress, retries and every file.

    python train_specialists.py --config configs/quickstart.yaml            # embedded Ray
    ray submit cluster.yaml train_specialists.py -- --config configs/...     # a cluster's head node
    ray job submit --working-dir . -- python train_specialists.py --config ...

The shape is Ray's own: a task is a pure function (:func:`specialists.train.train_one`) of values
in the object store, the generalist's weights and the data arrays, each put there *once* (for a
streamed image folder only the file paths and labels: each task reads the images it samples from
the files, so the folder must be at the same path on every node, e.g. shared storage); it
returns weights and metrics, and the driver writes them (atomically) as they arrive in a
``ray.wait`` loop, so no filesystem is shared between nodes and a finished specialist survives
anything that happens later. Failures are retried twice over: Ray re-executes a task whose worker
or node died (``max_retries``) or that raised a transient error (``retry_exceptions``); a failure
that outlives those retries (an owner or object lost) is resubmitted by the driver; a driver that
loses the cluster itself (the head gone) stops with one line within seconds (``ClusterWatch``). Before
submitting, the requested resources are checked against the nodes, so a cluster without the asked
GPUs is one clear error instead of tasks waiting forever.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.exceptions as rex
from tqdm.auto import tqdm

from specdistill.artifacts import load_weights, read_json
from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser
from specdistill.config import Config, stage_hash
from specdistill.engine import resolve_device
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.paths import elsewhere_hint
from specdistill.provenance import generalist_identity, is_done, mark_done
from specdistill.records import Clusters, SpecialistInfo
from specdistill.rundir import RunDir
from specialists import store
from specialists.model import as_class_index
from specialists.ray_cluster import (
    INFEASIBLE_GRACE_S,
    ClusterWatch,
    check_nodes,
    connect_ray,
    feasible,
    gcs_address,
    require_feasible,
    same_machine,
    task_resources,
)

STAGE = "specialists"
# failures of the machinery rather than of the work: worth another attempt
SYSTEM_FAILURES = (rex.WorkerCrashedError, rex.NodeDiedError, rex.OwnerDiedError, rex.ObjectLostError,
                   rex.LocalRayletDiedError, rex.ObjectFetchTimedOutError, rex.OutOfMemoryError,
                   rex.RaySystemError, rex.TaskUnschedulableError)
# exceptions raised inside a task that may pass on another attempt (CUDA hiccups, OOM, I/O)
TRANSIENT_EXCEPTIONS = [RuntimeError, OSError, MemoryError]


# ----------------------------------------------------------------------------------------------
# Inputs, checked on the driver before Ray starts


def load_inputs(cfg: Config, run: RunDir) -> dict[str, Any]:
    """The generalist, the groups and the data, each checked for the problems a user can fix."""
    if not run.generalist_weights.exists():
        raise SpecdistillError(f"missing generalist checkpoint {run.generalist_weights}; train it first "
                               f"(python -m generalist.train --run-dir {run.root}) or point --run-dir at its run"
                               + elsewhere_hint(run.root, "generalist/model.safetensors"))
    tensors, meta = load_weights(run.generalist_weights)
    num_classes = int(meta["num_classes"])
    groups = []
    for g in Clusters.read(run.clusters, num_classes).groups:
        try:   # what a specialist needs beyond valid class ids (e.g. more than one class)
            as_class_index(g.classes, num_classes)
        except SpecdistillError as exc:
            raise SpecdistillError(f"{run.clusters} group {g.id}: {exc}") from None
        groups.append({"id": g.id, "classes": g.classes, "names": g.names})

    data = None
    if not cfg.specialists.load_data_on_workers:
        data = _data_arrays(cfg, meta)
        for group in groups:
            if not np.isin(group["classes"], data["train_labels"]).any():
                raise SpecdistillError(f"group {group['id']} has no training examples (classes "
                                       f"{group['classes'][:5]}); check data.limit or rerun clustering")
    generalist = {"tensors": {k: v.numpy() for k, v in tensors.items()}, "meta": meta}
    return {"generalist": generalist, "generalist_identity": generalist_identity(run.generalist), "groups": groups,
            "data": data}


def _data_arrays(cfg: Config, generalist_meta: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The splits the tasks need; a streamed image folder's are ``FolderImages`` (paths, not pixels)."""
    from specdistill.data import load_data

    dataset = load_data(cfg.data, cfg.seed)
    if generalist_meta is not None and list(dataset.class_names) != list(generalist_meta["class_names"]):
        raise SpecdistillError(
            f"the data config gives {dataset.num_classes} classes that differ from the generalist's "
            f"{generalist_meta['num_classes']}; use the config the generalist was trained with"
        )
    return {"train_images": dataset.train.images, "train_labels": dataset.train.labels,
            "val_images": dataset.val.images, "val_labels": dataset.val.labels}


def with_train_top(cfg: Config, data: dict[str, Any], generalist: dict[str, Any]) -> dict[str, Any]:
    """``data`` plus the generalist's top-n on the training split when the specialists draw their
    dustbin from its confusions (``specialists.confusion_fraction``): one pass, shared by every task."""
    scfg = cfg.specialists
    if scfg.confusion_fraction <= 0 or "train_top" in data:
        return data
    from specialists.train import generalist_top_n

    began = time.perf_counter()
    top = generalist_top_n(generalist, data["train_images"], scfg.confusion_top_n, resolve_device(cfg.device),
                           scfg.train.eval_batch_size)
    print(f"specialists: the generalist's top-{scfg.confusion_top_n} on {len(top)} training images, for the "
          f"confusion-drawn dustbin ({time.perf_counter() - began:.0f} s)", flush=True)
    return {**data, "train_top": top}


# ----------------------------------------------------------------------------------------------
# The Ray task


_WORKER_DATA: dict[str, dict[str, np.ndarray]] = {}


def _train_task(generalist: dict[str, Any], data: dict[str, np.ndarray] | None, group: dict[str, Any],
                cfg_json: dict[str, Any], device: str, num_threads: int, work_dir: str | None) -> dict[str, Any]:
    """The Ray task: plain values in, plain values out (the driver writes the files)."""
    import torch

    from specialists.train import train_one

    torch.set_num_threads(num_threads)
    cfg = Config.model_validate(cfg_json)
    if cfg.data.loader_workers is None:   # a streamed folder: decode with the CPUs Ray gave this task
        cfg.data.loader_workers = num_threads
    if data is None:  # load_data_on_workers: every node reads (or renders) the dataset itself, once
        key = f"{cfg.data.model_dump_json()}:{cfg.seed}"
        if key not in _WORKER_DATA:
            _WORKER_DATA[key] = with_train_top(cfg, _data_arrays(cfg, generalist["meta"]), generalist)
        data = _WORKER_DATA[key]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-writable.*")  # object-store arrays are read-only
        result = train_one(generalist, group, data, cfg, device=device, work_dir=work_dir)
    result["ran_on"] = {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                        "pid": os.getpid(), "device": device}
    return result


_remote_train = ray.remote(_train_task)


# ----------------------------------------------------------------------------------------------
# The stage


def run_specialists(cfg: Config, force: bool = False, progress: bool = True, address: str | None = None,
                    on_written: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Train every group's specialist that is not already finished; write ``specialists/done.json``.

    ``address`` overrides ``specialists.ray_address``. ``on_written(m, done, total)`` is called
    after each specialist is on disk (tests use it to disturb the cluster mid-run).
    """
    run = RunDir.at(prepare_run_dir(cfg, force))
    spec_dir = run.specialists
    inputs = load_inputs(cfg, run)
    groups = inputs["groups"]
    keys = {g["id"]: store.specialist_key(cfg, inputs["generalist_identity"], g) for g in groups}
    todo = [g for g in groups if force or not store.is_finished(run, g, keys[g["id"]])]
    digest = stage_hash(cfg, STAGE)
    if not todo and is_done(run.root, STAGE, digest):
        done = read_json(run.done(STAGE))
        if done.get("ids") == [g["id"] for g in groups]:
            print(f"specialists: all {len(groups)} already trained in {spec_dir} (config hash {digest}); "
                  "use --force to retrain")
            return {**done, "trained": 0, "skipped": len(groups), "resubmitted": 0}
    if force:  # also forget half-trained checkpoints of an interrupted run
        shutil.rmtree(run.specialists_work, ignore_errors=True)
    began = time.perf_counter()
    summary: dict[str, Any] = {"total": len(groups), "skipped": len(groups) - len(todo), "trained": 0,
                               "resubmitted": 0}
    if todo:
        print(f"specialists: {len(todo)} to train, {summary['skipped']} already finished -> {spec_dir}", flush=True)
        if inputs["data"] is not None:   # only when something is left to train (a pass over the training split)
            inputs["data"] = with_train_top(cfg, inputs["data"], inputs["generalist"])
        target = address if address is not None else cfg.specialists.ray_address
        started = connect_ray(target)
        watch = ClusterWatch(gcs_address(target)).start()   # a lost cluster: one line, not a hang
        try:
            summary.update(_fan_out(cfg, inputs, todo, keys, run, progress, on_written, watch))
        finally:
            watch.stop()
            if started and watch.lost is not None:
                watch.skip_ray_teardown()   # it would block on the lost GCS, then log a fatal error
            elif started:
                ray.shutdown()
    _remove_stale(spec_dir, {g["id"] for g in groups})
    shutil.rmtree(run.specialists_work, ignore_errors=True)
    infos = [SpecialistInfo.read(run.specialist_info(g["id"]), inputs["generalist"]["meta"]["num_classes"])
             for g in groups]
    summary.update(_summarise(infos), seconds=round(time.perf_counter() - began, 1))
    mark_done(run.root, STAGE, digest, ids=[g["id"] for g in groups],
              **{k: v for k, v in summary.items() if k != "ids"})
    print(f"specialists: {summary['trained']} trained, {summary['skipped']} reused, {summary['total']} in all; "
          f"held-out accuracy within the group {summary['mean_specialist_group_acc']:.4f} vs the "
          f"generalist's {summary['mean_generalist_group_acc']:.4f} ({summary['seconds']:.0f} s) -> {spec_dir}")
    return summary


def _fan_out(cfg: Config, inputs: dict[str, Any], todo: list[dict[str, Any]], keys: dict[int, str],
             run: RunDir, progress: bool, on_written: Callable[[int, int, int], None] | None,
             watch: ClusterWatch) -> dict[str, Any]:
    scfg = cfg.specialists
    total = len(inputs["groups"])
    done = total - len(todo)
    pending: dict[ray.ObjectRef, dict[str, Any]] = {}
    watch.describe = lambda cause: _lost_line(watch.address, cause, len(pending) or len(todo), total, done, run)
    resources = task_resources(cfg)
    check_nodes({"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]})   # before any task waits on them
    device = "cuda" if resources["num_gpus"] > 0 else "cpu"
    threads = max(1, int(resources["num_cpus"]))
    local_fs = same_machine()
    generalist_ref = ray.put(inputs["generalist"])                     # once, shared by every task
    data_ref = ray.put(inputs["data"]) if inputs["data"] is not None else None
    cfg_json = cfg.model_dump(mode="json")
    options = {"num_cpus": resources["num_cpus"], "num_gpus": resources["num_gpus"],
               "max_retries": scfg.max_retries, "retry_exceptions": TRANSIENT_EXCEPTIONS}

    def submit(group: dict[str, Any]) -> ray.ObjectRef:
        # on one machine the engine checkpoints each epoch into the run dir, so a killed run resumes
        work = str((run.specialists_work / f"{group['id']:04d}-{keys[group['id']]}").resolve()) if local_fs else None
        return _remote_train.options(name=f"specialist-{group['id']}", **options).remote(
            generalist_ref, data_ref, group, cfg_json, device, threads, work)

    pending = {submit(g): g for g in todo}
    attempts = {g["id"]: 1 for g in todo}
    resubmitted = trained = 0
    infeasible_since: float | None = None
    bar = tqdm(total=total, initial=done, desc="specialists", unit="specialist", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=watch.interval_s)
            watch.check()
            if not ready:
                if watch.reachable() is not None:
                    continue   # ray.nodes() would block on a GCS that is gone: let the watch decide
                ok, _ = feasible({"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]})
                infeasible_since = None if ok else (infeasible_since or time.monotonic())
                if infeasible_since and time.monotonic() - infeasible_since > INFEASIBLE_GRACE_S:
                    require_feasible({"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]})
                continue
            ref = ready[0]
            group = pending.pop(ref)
            m = group["id"]
            try:
                result = ray.get(ref)
            except SYSTEM_FAILURES as exc:
                cause = watch.reachable()
                if cause is not None:   # the cluster is gone, not only this task's worker
                    pending[ref] = group   # unfinished, as the line counts it
                    raise SpecdistillError(watch.describe(f"{type(exc).__name__}, and its GCS does not answer: "
                                                          f"{cause}")) from None
                if attempts[m] > scfg.max_retries:
                    raise SpecdistillError(
                        f"specialist {m} failed {attempts[m]} times ({type(exc).__name__}); the {done} finished "
                        "specialists are saved: check the cluster and run the same command again") from None
                attempts[m] += 1
                resubmitted += 1
                bar.write(f"specialist {m}: {type(exc).__name__}; resubmitting (attempt {attempts[m]})")
                pending[submit(group)] = group
                continue
            except rex.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, SpecdistillError):
                    raise SpecdistillError(f"specialist {m}: {cause}") from None
                bar.write(str(exc))
                first_line = (str(cause).splitlines() or [""])[0]
                raise SpecdistillError(
                    f"specialist {m} failed: {type(cause).__name__}: {first_line} "
                    f"(traceback above); the {done} finished specialists are saved, fix the cause and run again"
                ) from None
            del ref
            info = store.write_specialist(run, result, keys[m])
            shutil.rmtree(run.specialists_work / f"{m:04d}-{keys[m]}", ignore_errors=True)
            done += 1
            trained += 1
            met = info.metrics
            bar.set_postfix_str(f"#{m} group acc {met['specialist_group_acc']:.3f} "
                                f"(generalist {met['generalist_group_acc']:.3f})")
            bar.update(1)
            if on_written is not None:
                on_written(m, done, total)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return {"trained": trained, "resubmitted": resubmitted, "num_cpus_per_task": resources["num_cpus"],
            "num_gpus_per_task": resources["num_gpus"]}


def _lost_line(address: str | None, cause: str, unfinished: int, total: int, done: int, run: RunDir) -> str:
    saved = (f"the {done} finished are saved in {run.specialists}" if done else "no specialist had finished yet")
    return (f"lost the connection to the Ray cluster at {address} while {unfinished} of {total} specialists were "
            f"training or queued ({cause}); {saved}: start the cluster again if it stopped and rerun the same "
            "command to train the rest")


def _remove_stale(spec_dir: Path, ids: set[int]) -> None:
    """Drop specialists of groups that no longer exist (clustering was rerun with another k)."""
    for path in list(spec_dir.glob("[0-9][0-9][0-9][0-9].*")):
        if path.suffix in (".json", ".safetensors") and path.stem.isdigit() and int(path.stem) not in ids:
            path.unlink(missing_ok=True)


def _summarise(infos: list[SpecialistInfo]) -> dict[str, Any]:
    def mean(key: str) -> float:
        values = [i.metrics[key] for i in infos if np.isfinite(i.metrics.get(key, float("nan")))]
        return float(np.mean(values)) if values else float("nan")

    return {"mean_specialist_group_acc": mean("specialist_group_acc"),
            "mean_generalist_group_acc": mean("generalist_group_acc"),
            "mean_group_acc_gain": mean("group_acc_gain")}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    parser = stage_parser("Stage 3: train one specialist per group as Ray tasks (embedded Ray or a cluster).")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to use: host:port, 'auto', or 'local' for an embedded Ray "
                             "(default: RAY_ADDRESS, else a cluster started on this machine, else embedded)")
    args = parser.parse_args(argv)
    run_specialists(config_from_args(args), force=args.force, address=args.address)


if __name__ == "__main__":
    main()
