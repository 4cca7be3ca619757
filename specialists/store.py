"""Specialists in the run directory: ``specialists/<m:04d>.safetensors`` + ``<m:04d>.json``.

The driver writes both files (weights first, then the JSON that names the weights' SHA-256), each
atomically, so a specialist counts as finished only when its JSON exists, carries the key of the
current inputs and matches the weights on disk. A rerun skips exactly those. The weights file's
metadata repeats the JSON (and the architecture), so ``specdistill.models.load_classifier`` can
rebuild a specialist from the one file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from specdistill.artifacts import save_weights
from specdistill.config import Config, stage_hash
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_file, digest_json
from specdistill.models import Classifier, load_classifier
from specdistill.provenance import require_done
from specdistill.records import SpecialistInfo
from specdistill.rundir import RunDir


def file_sha256(path: str | os.PathLike) -> str:
    """The full SHA-256 of a file: ``weights_sha256`` stays a real checksum anyone can verify."""
    return digest_file(path, length=None)


def specialist_key(cfg: Config, generalist_identity: str, group: dict[str, Any]) -> str:
    """What a finished specialist must match to be reused: config, the generalist (by content, see
    ``specdistill.provenance``: rewriting identical weights retrains nothing), the group."""
    cfg = cfg.model_copy(deep=True)
    cfg.specialists.load_data_on_workers = False   # where data is read does not change the result
    return digest_json([stage_hash(cfg, "specialists"), generalist_identity, int(group["id"]),
                        [int(c) for c in group["classes"]]])


def is_finished(run: RunDir, group: dict[str, Any], key: str) -> bool:
    """A specialist is finished when its record is readable, was trained for this key and this group's
    classes, and its weights are the file it names; anything else (deleted, damaged, hand-edited) is
    trained again."""
    m = int(group["id"])
    info_file, weights_file = run.specialist_info(m), run.specialist_weights(m)
    if not (info_file.exists() and weights_file.exists()):
        return False
    try:
        info = SpecialistInfo.read(info_file)
    except SpecdistillError:
        return False
    return (info.key == key and info.classes == list(group["classes"])
            and info.weights_sha256 == file_sha256(weights_file))


def write_specialist(run: RunDir, result: dict[str, Any], key: str) -> SpecialistInfo:
    """Write one trained specialist (the dict :func:`specialists.train.train_one` returns)."""
    m = int(result["id"])
    info = SpecialistInfo(m, list(result["classes"]), list(result["names"]), float(result["dustbin_correction"]),
                          group_share=result["group_share"], training_fraction=result["training_fraction"],
                          key=key, metrics=result["metrics"], ran_on=result.get("ran_on"))
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in result["tensors"].items()}
    save_weights(run.specialist_weights(m), tensors, {**result["model_meta"], **info.to_json()})
    info.weights_sha256 = file_sha256(run.specialist_weights(m))
    info.write(run.specialist_info(m))
    return info


def load_specialist(run: RunDir, m: int, device: str | torch.device = "cpu",
                    num_classes: int | None = None) -> tuple[Classifier, SpecialistInfo]:
    """One specialist (eval mode) and its record, checked against each other (and the generalist's
    ``num_classes`` when given)."""
    info = SpecialistInfo.read(run.specialist_info(m), num_classes)
    model, _ = load_classifier(run.specialist_weights(m), device)
    if model.num_classes != len(info.classes) + 1:
        raise SpecdistillError(f"{run.specialist_weights(m)} has {model.num_classes} outputs but "
                               f"{run.specialist_info(m)} names {len(info.classes)} classes + dustbin; delete "
                               "both and rerun the specialists stage (specdistill run CONFIG --from specialists)")
    return model, info


def finished_ids(run: RunDir) -> list[int]:
    """The specialists of the finished stage, in group order (as listed in ``specialists/done.json``)."""
    ids = require_done(run.root, "specialists").get("ids")
    if not ids:
        raise SpecdistillError(f"{run.done('specialists')} lists no specialists; rerun that stage "
                               "(specdistill run CONFIG --from specialists)")
    return list(ids)


def load_specialists(run: RunDir | str | os.PathLike, device: str | torch.device = "cpu",
                     num_classes: int | None = None) -> list[tuple[Classifier, SpecialistInfo]]:
    """Every specialist of a finished stage, in group order."""
    run = run if isinstance(run, RunDir) else RunDir.at(run)
    return [load_specialist(run, m, device, num_classes) for m in finished_ids(run)]
