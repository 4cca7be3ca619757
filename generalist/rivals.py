"""Further generalists: other seeds, and the same recipe trained longer.

They are what a user would do with the specialists' compute instead, so the combine stage reports
them beside the ensemble (``combine.rivals``), and the student's ``generalists`` teacher averages
the seeds. Each one lives in its own folder of the run directory with its own ``done.json`` (hash of
the generalist config that made it), so a rerun skips finished ones and a killed one resumes from
its checkpoint:

* ``generalist-seed<s>/`` - the generalist recipe from another seed;
* ``generalist-epochs<E>/`` - the generalist recipe (the run's own seed) trained for E epochs.

A run whose config then asks for that recipe (``--set generalist.train.epochs=E`` or ``--set seed=s``)
adopts the rival as its generalist instead of training it again (:func:`adopt_rival`).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from generalist.importing import imports
from specdistill.artifacts import read_json
from specdistill.config import Config, stage_hash
from specdistill.data import Dataset
from specdistill.errors import SpecdistillError
from specdistill.predictions import StoredPredictions
from specdistill.provenance import is_done, mark_done, require_done
from specdistill.rundir import RunDir


def generalist_dir(cfg: Config, seed: int) -> Path:
    """The run's own generalist for its seed, else the folder of a further one from that seed."""
    run = RunDir.of(cfg)
    return run.generalist if seed == cfg.seed else run.generalist_seed(seed)


def longer_dir(cfg: Config, epochs: int) -> Path:
    """The folder of the generalist recipe trained for ``epochs`` (the run's own when that is its count)."""
    run = RunDir.of(cfg)
    return run.generalist if epochs == cfg.generalist.train.epochs else run.root / f"generalist-epochs{epochs}"


def seed_rival(cfg: Config, seed: int) -> tuple[Path, Config]:
    """The folder of the generalist recipe from ``seed`` (the run's own for its seed) and that recipe."""
    return generalist_dir(cfg, seed), cfg.model_copy(update={"seed": seed})


def longer_rival(cfg: Config, epochs: int) -> tuple[Path, Config]:
    """The folder of the generalist recipe trained for ``epochs`` and that recipe (:func:`stretched`)."""
    return longer_dir(cfg, epochs), stretched(cfg, epochs)


def rival_done(cfg: Config, folder: Path, variant: Config, quiet: bool = True) -> bool:
    """True when ``folder`` holds a generalist finished for ``variant`` (the run's own generalist counts:
    the generalist stage checks it)."""
    run = RunDir.of(cfg)
    return folder == run.generalist or is_done(run.root, folder.name, stage_hash(variant, "generalist"), quiet=quiet)


def recipe_fields(cfg: Config) -> dict:
    """What a generalist's done.json says of the recipe that trained it: the epochs and early stopping's
    patience (:func:`adopt_rival` reads them back to name the rival it becomes)."""
    return {"epochs": cfg.generalist.train.epochs, "patience": cfg.generalist.train.patience}


def _ensure(cfg: Config, folder: Path, variant: Config, dataset: Dataset, progress: bool) -> Path:
    """Train ``variant``'s generalist into ``folder`` unless it is done there for that config."""
    from generalist.train import train_generalist  # the stage's own code, imported when needed

    run = RunDir.of(cfg)
    if not rival_done(cfg, folder, variant, quiet=False):
        if run.done(folder.name).exists():   # finished for another config: start over
            shutil.rmtree(folder)
        train_generalist(variant, folder, seed=variant.seed, dataset=dataset, progress=progress)
        mark_done(run.root, folder.name, stage_hash(variant, "generalist"), **recipe_fields(variant))
    return folder


def _require_recipe(cfg: Config, what: str) -> None:
    if imports(cfg):
        raise SpecdistillError(
            f"{what} trains further generalists with generalist.train, but this run imports its generalist "
            "(generalist.weights / model.pretrained), so there is no recipe to repeat; turn it off "
            "(combine.rivals=false, or another student.teacher)")
    require_done(RunDir.of(cfg).root, "generalist", stage_hash(cfg, "generalist"))


def ensure_generalists(cfg: Config, dataset: Dataset, seeds: Sequence[int], progress: bool = True) -> list[Path]:
    """The folder of a generalist per seed, training the missing ones with ``generalist.train``."""
    _require_recipe(cfg, "an ensemble of generalists")
    return [_ensure(cfg, *seed_rival(cfg, seed), dataset, progress) for seed in dict.fromkeys(seeds)]


def ensure_longer_generalist(cfg: Config, dataset: Dataset, epochs: int, progress: bool = True) -> Path:
    """The folder of the run's generalist recipe trained for ``epochs`` instead (same seed, the same
    schedule stretched over the longer run, :func:`stretched`), training it when missing."""
    _require_recipe(cfg, "a generalist trained longer")
    return _ensure(cfg, *longer_rival(cfg, epochs), dataset, progress)


def stretched(cfg: Config, epochs: int) -> Config:
    """``cfg``'s generalist recipe stretched to ``epochs``: the learning-rate schedule follows the epoch
    count, and early stopping's patience is stretched by the same factor (rounded up). Kept as it was,
    a 65-epoch run's learning rate is still high where the 20-epoch run's had decayed, and its held-out
    accuracy plateaus there: hanzi-1k's generalist stretched from 20 to 65 epochs with patience 4 stopped
    at epoch 13 (best epoch 9, 93.5% held-out against the 20-epoch run's 96.7%): not the rival a user
    who trained longer would have."""
    patience = cfg.generalist.train.patience
    if patience is not None and epochs > cfg.generalist.train.epochs:
        patience = math.ceil(patience * epochs / cfg.generalist.train.epochs)
    return with_epochs(cfg, epochs, patience)


def with_epochs(cfg: Config, epochs: int, patience: int | None) -> Config:
    """``cfg`` with its generalist recipe trained for ``epochs`` (the schedule stretched to match) and
    early stopping's ``patience``."""
    train = cfg.generalist.train.model_copy(update={"epochs": int(epochs), "patience": patience})
    return cfg.model_copy(update={"generalist": cfg.generalist.model_copy(update={"train": train})})


def adopt_rival(cfg: Config) -> bool:
    """Make a finished rival the run's generalist when it is exactly the recipe ``cfg`` asks for.

    ``combine.rivals`` trains ``generalist-epochs<E>/`` and ``generalist-seed<s>/``; a user who then sets
    ``generalist.train.epochs=E`` or ``seed=s`` would otherwise train the same network again. The
    generalist it replaces becomes the rival for its own epoch count or seed when it is the same recipe
    otherwise (else it is dropped, as any generalist of another config is), so nothing trained for this
    recipe is lost. Each move is a rename; ``done.json`` is rewritten after. True when one was adopted.
    """
    run = RunDir.of(cfg)
    digest = stage_hash(cfg, "generalist")
    found = [folder for folder in (run.root / f"generalist-epochs{cfg.generalist.train.epochs}",
                                   run.generalist_seed(cfg.seed))
             if not imports(cfg) and is_done(run.root, folder.name, digest, quiet=True)]
    if not found:
        return False
    replaced = _replaced_as_rival(cfg, run)
    if replaced is not None:
        keep, variant, what = replaced
        shutil.rmtree(keep, ignore_errors=True)
        os.replace(run.generalist, keep)
        mark_done(run.root, keep.name, stage_hash(variant, "generalist"), **recipe_fields(variant))
        print(f"generalist: the generalist it replaces ({what}) is kept as a rival in {keep}")
    else:
        shutil.rmtree(run.generalist, ignore_errors=True)
    os.replace(found[0], run.generalist)
    print(f"generalist: this recipe was already trained as a rival in {found[0]} (combine.rivals): adopted, "
          "not trained again")
    return True


def _replaced_as_rival(cfg: Config, run: RunDir) -> tuple[Path, Config, str] | None:
    """Where the run's finished generalist goes when ``cfg`` differs from its recipe only in the epoch
    count (``generalist-epochs<E>/``) or only in the seed (``generalist-seed<s>/``), with that recipe and
    a few words; None when it is another recipe. The epochs (and the patience it stopped with, which a
    rival trained longer had stretched) come from its done.json, or its meta for older runs without
    early stopping; the seed from its meta."""
    try:
        done, meta = read_json(run.done("generalist")), read_json(run.generalist_meta)
    except SpecdistillError:
        return None
    metrics = meta.get("metrics", {})
    candidates: list[tuple[Path, Config, str]] = []
    for epochs in [done.get("epochs")] + ([metrics.get("epochs_run")] if not metrics.get("stopped_early") else []):
        if isinstance(epochs, int) and epochs > 0 and epochs != cfg.generalist.train.epochs:
            variant = with_epochs(cfg, epochs, done.get("patience", cfg.generalist.train.patience))
            candidates.append((run.root / f"generalist-epochs{epochs}", variant, f"{epochs} epochs"))
    seed = meta.get("seed")
    if isinstance(seed, int) and seed != cfg.seed:
        candidates.append((run.generalist_seed(seed), cfg.model_copy(update={"seed": seed}), f"seed {seed}"))
    return next((c for c in candidates if stage_hash(c[1], "generalist") == done.get("config_hash")), None)


def specialist_images(infos: Sequence[dict]) -> tuple[int, bool]:
    """Training images the specialists processed in all, in generalist-sized passes, from their records
    (``specialists/<id>.json``): a wider specialist's image (``specialists.model``) counts its multiply-adds
    over the generalist's. The flag says the number is exact (newer records count images; older ones give
    rate x seconds)."""
    total, exact = 0.0, True
    for info in infos:
        metrics = info.get("metrics", {})
        if "images_seen" in metrics:
            images = float(metrics["images_seen"])
        else:
            images = float(metrics.get("images_per_s") or 0.0) * float(metrics.get("train_seconds") or 0.0)
            exact = False
        total += images * float(metrics.get("macs_ratio", 1.0))
    return int(round(total)), exact


def mean_accuracy(folders: Sequence[Path], split: str, labels: np.ndarray) -> float:
    """Top-1 accuracy of the mean distribution of several generalists' stored predictions on ``split``,
    read in row blocks (dense or top-k form: ``specdistill.predictions``), never N x K whole."""
    stores = [StoredPredictions.open(folder, split) for folder in folders]
    if any(store.num_examples != len(labels) for store in stores):
        raise SpecdistillError(f"the stored {split} predictions of {', '.join(str(f) for f in folders)} do not "
                               f"have {len(labels)} rows; they were made with other data, delete those folders")
    rows_per_block = max(1, 2**24 // max(1, len(stores) * stores[0].num_classes))
    correct = 0
    for parts in zip(*(store.blocks(rows_per_block) for store in stores)):
        stacked = torch.stack([torch.as_tensor(block) for _, block in parts])
        mean = torch.logsumexp(stacked, dim=0)   # the log of the summed (so of the mean) distribution
        correct += int((mean.argmax(1).numpy() == labels[parts[0][0]]).sum())
    return correct / len(labels) if len(labels) else float("nan")
