"""Stage completion with provenance: a stage counts as done only for the inputs it was computed from.

``<run>/<stage>/done.json`` is written last by every stage and records

* ``config_hash`` - the hash of the config sections the stage depends on (``config.stage_hash``);
* ``identity`` - what the stage produced, by *content*: the generalist's tensors and stored
  predictions, the groups, each specialist's classes, correction and tensors, the combine numbers,
  the student's tensors. Not file bytes, which embed timings: rewriting identical weights keeps the
  identity, so nothing downstream is redone for it;
* ``inputs`` - the identities of the upstream stages it read, as they were when it finished.

:func:`is_done` recomputes both from the files on disk, so a stage is redone (and says why) when its
own artifacts were deleted, damaged or edited, or when anything upstream changed since it ran: a
generalist retrained with ``--force``, a specialist file replaced, a clusters.json edited by hand.
A changed upstream never yields exit 0 with old numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from specdistill.artifacts import load_weights, read_json, write_json
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_arrays, digest_file, digest_json
from specdistill.records import Clusters, CombineResult, SpecialistInfo
from specdistill.rundir import SPLITS, RunDir

# bump when the run-directory layout changes incompatibly. 2: combine/eval.json holds per-split
# results (records.CombineResult), done.json records provenance
FORMAT_VERSION = 2

UPSTREAM = {
    "generalist": (),
    "clustering": ("generalist",),
    "specialists": ("generalist", "clustering"),
    "combine": ("generalist", "specialists"),
    "student": ("generalist", "specialists", "combine"),
}


class Unreadable(Exception):
    """An artifact that is missing or cannot be read: the stage that wrote it is not done."""


# ---------------------------------------------------------------------------------------------- identities


# Every stage's check recomputes its inputs' identities, so one pipeline run would hash the same
# weights and predictions several times: remember each file's digest while its bytes cannot have
# changed (artifacts are replaced by rename, which gives a new inode and modification time).
_DIGESTS: dict[tuple, str] = {}


def _remembered(path: Path, kind: str, compute) -> str:
    stat = path.stat()
    key = (str(path.resolve()), kind, stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        _DIGESTS[key] = compute()
    return _DIGESTS[key]


def _tensors_digest(path: Path) -> str:
    if not path.exists():
        raise Unreadable(f"{path} is missing")

    def compute() -> str:
        try:
            tensors, _ = load_weights(path)
        except SpecdistillError as exc:
            raise Unreadable(str(exc)) from None
        names = sorted(tensors)
        return digest_json([names, digest_arrays(*(tensors[name].numpy() for name in names))])

    return _remembered(path, "tensors", compute)


def _optional_file(path: Path) -> str | None:
    return _remembered(path, "bytes", lambda: digest_file(path)) if path.exists() else None


def generalist_identity(folder: Path) -> str:
    """The generalist's tensors and its stored predictions (what clustering and reports read).

    Each part may be absent (clustering needs only the predictions), but is then absent in the
    identity too: deleting a file changes it; a damaged file makes it unreadable.
    """
    weights = RunDir.weights_in(folder)
    parts = {"weights": _tensors_digest(weights) if weights.exists() else None}
    for split in SPLITS:
        parts[f"preds-{split}"] = _optional_file(RunDir.preds_in(folder, split))
        topk = RunDir.topk_preds_in(folder, split)
        if topk.exists():   # large K: the top-k form instead (absent from the identity where it is absent)
            parts[f"preds-{split}-topk"] = _remembered(topk, "topk", lambda path=topk: _read(_topk_digest, path))
        parts[f"labels-{split}"] = _optional_file(RunDir.labels_in(folder, split))
    return digest_json(parts)


def _topk_digest(path: Path) -> str:
    from specdistill.predictions import StoredPredictions

    return StoredPredictions.read_topk(path).content_digest()


def _read(reader, *args):
    try:
        return reader(*args)
    except SpecdistillError as exc:
        raise Unreadable(str(exc)) from None


def clustering_identity(run: RunDir) -> str:
    clusters = _read(Clusters.read, run.clusters)
    return digest_json([[g.id, g.classes] for g in clusters.groups])


def specialists_identity(run: RunDir, ids: list[int] | None = None) -> str:
    """Each listed specialist's classes, correction and tensors (``ids``: from specialists/done.json)."""
    if ids is None:
        done = _read(read_json, run.done("specialists"))
        ids = done.get("ids") if isinstance(done, dict) else None
    parts = []
    for m in ids or []:
        info = _read(SpecialistInfo.read, run.specialist_info(m))
        parts.append([m, info.classes, info.dustbin_correction, _tensors_digest(run.specialist_weights(m))])
    return digest_json(parts)


def combine_identity(run: RunDir) -> str:
    """The numbers the student reads (accuracies), the calibration and gate its ensemble teacher applies."""
    result = _read(CombineResult.read, run.combine_eval)
    calibration = _read(read_json, run.calibration) if run.calibration.exists() else None
    gating = _read(read_json, run.gating) if run.gating.exists() else None
    return digest_json({"systems": {name: s.systems for name, s in result.splits.items()},
                        "calibration": calibration, "gating": gating})


def student_identity(run: RunDir) -> str:
    return _tensors_digest(run.student_weights)


def identity(run: RunDir, stage: str, ids: list[int] | None = None) -> str:
    """The content identity of a stage's outputs as they are on disk now; :class:`Unreadable` if they are not.

    ``ids`` names the specialists while their done.json is being written.
    """
    if stage.startswith("generalist"):   # the run's generalist, or a further seed's (generalist-seed<s>)
        return generalist_identity(run.stage(stage))
    if stage == "specialists":
        return specialists_identity(run, ids)
    return {"clustering": clustering_identity, "combine": combine_identity, "student": student_identity}[stage](run)


def current_identity(run: RunDir, stage: str) -> str | None:
    """As :func:`identity`, ``None`` where the stage has produced nothing readable."""
    try:
        return identity(run, stage)
    except Unreadable:
        return None


# ---------------------------------------------------------------------------------------------- done.json


def mark_done(run_dir: str | os.PathLike, stage: str, config_hash: str,
              inputs: dict[str, str | None] | None = None, **extra: Any) -> None:
    """Record that ``stage`` finished: its config hash, its outputs' identity and its inputs'.

    ``inputs`` defaults to the identities of the stage's upstream stages (:data:`UPSTREAM`) now; a
    stage that read something else (clustering from a user's ``--probs`` file) passes its own.
    """
    run = RunDir.at(run_dir)
    if inputs is None:
        inputs = {up: current_identity(run, up) for up in UPSTREAM.get(stage, ())}
    write_json(run.done(stage), {"stage": stage, "config_hash": config_hash, "format_version": FORMAT_VERSION,
                                 "identity": identity(run, stage, extra.get("ids")), "inputs": inputs, **extra})


def stale_reason(run_dir: str | os.PathLike, stage: str, config_hash: str) -> str | None:
    """Why ``stage`` must be (re)done, or ``None`` when it finished for this config and these inputs."""
    run = RunDir.at(run_dir)
    marker = run.done(stage)
    if not marker.exists():
        return "not run yet"
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{marker} is damaged"
    if not isinstance(done, dict):
        return f"{marker} is damaged"
    check_format(marker, done)
    if done.get("config_hash") != config_hash:
        return "it ran with another config"
    try:
        now = identity(run, stage)
    except Unreadable as exc:
        return f"its output is unreadable ({exc})"
    if now != done.get("identity"):
        return "its output was changed or replaced since it finished"
    for up, recorded in (done.get("inputs") or {}).items():
        if current_identity(run, up) != recorded:
            return f"the {up} stage's output changed since it ran"
    return None


def is_done(run_dir: str | os.PathLike, stage: str, config_hash: str, quiet: bool = False) -> bool:
    """True when the stage finished with this config hash on the inputs now on disk.

    A stage that finished but is stale says why (unless ``quiet``), so a redo is never a surprise.
    """
    reason = stale_reason(run_dir, stage, config_hash)
    if reason is not None and reason != "not run yet" and not quiet:
        print(f"{stage}: redoing it in {Path(run_dir).resolve()}: {reason}", flush=True)
    return reason is None


def check_format(marker: Path, done: dict) -> None:
    """A run directory written by a specdistill with another layout is refused, not misread."""
    found = done.get("format_version")
    if found != FORMAT_VERSION:
        older = found is None or (isinstance(found, int) and found < FORMAT_VERSION)
        age = "an older" if older else "a newer"
        raise SpecdistillError(
            f"{marker} was written by {age} specdistill (run-directory format {found}, this one reads "
            f"{FORMAT_VERSION}); use a new run directory, or pass --force to redo the stage here"
        )


def require_done(run_dir: str | os.PathLike, stage: str, config_hash: str | None = None) -> dict:
    """Check an upstream stage finished (and, if given, with this config hash) before reading it."""
    run = RunDir.at(run_dir)
    marker = run.done(stage)
    if not marker.exists():   # say where an earlier run of the stage did write, if it can be found
        from specdistill.paths import elsewhere_hint

        hint = elsewhere_hint(run.root.resolve(), marker.relative_to(run.root))
        raise SpecdistillError(f"stage '{stage}' has not finished in {run.root.resolve()} (no {marker}); run it "
                               f"first (specdistill run CONFIG){hint}")
    done = read_json(marker)
    check_format(marker, done)
    if config_hash is not None and done.get("config_hash") != config_hash:
        raise SpecdistillError(
            f"{marker} was produced by a different config; rerun '{stage}' with this config "
            "(specdistill run CONFIG --from " + stage + ") or use another run directory"
        )
    return done
