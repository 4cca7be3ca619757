"""Specialists in the run directory: ``specialists/<m:04d>.safetensors`` + ``<m:04d>.json``.

The driver writes both files (weights first, then the JSON that names the weights' SHA-256), each
atomically, so a specialist counts as finished only when its JSON exists, carries the key of the
current inputs and matches the weights on disk. A rerun skips exactly those. The weights file's
metadata repeats the JSON (and the architecture), so ``specdistill.models.load_classifier`` can
rebuild a specialist from the one file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdistill.artifacts import read_json, save_weights, write_json
from specdistill.config import Config, stage_hash
from specdistill.errors import SpecdistillError
from specdistill.models import Classifier, load_classifier


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_path(spec_dir: Path, m: int) -> Path:
    return spec_dir / f"{m:04d}.safetensors"


def info_path(spec_dir: Path, m: int) -> Path:
    return spec_dir / f"{m:04d}.json"


def specialist_key(cfg: Config, generalist_sha: str, group: dict[str, Any]) -> str:
    """What a finished specialist must match to be reused: config, generalist weights, group."""
    cfg = cfg.model_copy(deep=True)
    cfg.specialists.load_data_on_workers = False   # where data is read does not change the result
    blob = json.dumps([stage_hash(cfg, "specialists"), generalist_sha, int(group["id"]),
                       [int(c) for c in group["classes"]]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_finished(spec_dir: Path, m: int, key: str) -> bool:
    info_file, weights_file = info_path(spec_dir, m), weights_path(spec_dir, m)
    if not (info_file.exists() and weights_file.exists()):
        return False
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return info.get("key") == key and info.get("weights_sha256") == file_sha256(weights_file)


def write_specialist(spec_dir: Path, result: dict[str, Any], key: str) -> dict[str, Any]:
    """Write one trained specialist (the dict :func:`specialists.train.train_one` returns)."""
    m = int(result["id"])
    info = {
        "id": m, "classes": result["classes"], "names": result["names"],
        "dustbin_correction": float(result["dustbin_correction"]),
        "oversampling_factor": math.exp(result["dustbin_correction"]),
        "group_share": result["group_share"], "training_fraction": result["training_fraction"],
        "key": key, "metrics": result["metrics"], "ran_on": result.get("ran_on"),
    }
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in result["tensors"].items()}
    save_weights(weights_path(spec_dir, m), tensors, {**result["model_meta"], **info})
    info["weights_sha256"] = file_sha256(weights_path(spec_dir, m))
    write_json(info_path(spec_dir, m), info)
    return info


def load_specialist(spec_dir: str | os.PathLike, m: int,
                    device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """One specialist (eval mode) and its JSON (``classes``, ``dustbin_correction``, ``metrics``...)."""
    spec_dir = Path(spec_dir)
    info = read_json(info_path(spec_dir, m))
    model, _ = load_classifier(weights_path(spec_dir, m), device)
    if model.num_classes != len(info["classes"]) + 1:
        raise SpecdistillError(f"{weights_path(spec_dir, m)} has {model.num_classes} outputs but its JSON names "
                               f"{len(info['classes'])} classes + dustbin; delete both and rerun the specialists")
    return model, info


def load_specialists(run_dir: str | os.PathLike,
                     device: str | torch.device = "cpu") -> list[tuple[Classifier, dict[str, Any]]]:
    """Every specialist of a finished stage, in group order (as listed in ``specialists/done.json``)."""
    spec_dir = Path(run_dir) / "specialists"
    done = read_json(spec_dir / "done.json")
    return [load_specialist(spec_dir, m, device) for m in done["ids"]]
