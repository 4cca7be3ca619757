"""What else the specialists' compute could buy: the baselines a user weighs against them.

``combine.rivals: true`` trains, beside the ensemble and on the same examples (issue 12):

* **the generalist trained longer** - the run's generalist recipe (same net and seed; schedule and
  early-stopping patience stretched) for its own epochs plus the specialists' training compute in generalist epochs: the
  training images all specialists processed (``specialists/<id>.json``) over the training split's
  size, rounded, at least one. A specialist is a copy of the generalist's network with a small head,
  so an image costs it what it costs the generalist;
* **an ensemble of generalists** - the mean distribution of the run's generalist and one more from
  the next seed (``generalist-seed<s+1>/``, shared with the student's ``generalists`` teacher): one
  more generalist's training, the paper's "ensemble of models" (section 4).

Both are trained by ``generalist/rivals.py`` into their own folders with their own ``done.json``,
so a rerun of the combine stage reuses them, and scores them again when a folder no longer holds the
recipe its record names (:func:`stale_rivals`). Their accuracies go into ``combine/eval.json``
(``rivals``) and the combine report, held-out beside test.
"""

from __future__ import annotations

from typing import Any

from generalist.rivals import (
    ensure_generalists,
    ensure_longer_generalist,
    longer_rival,
    mean_accuracy,
    rival_done,
    seed_rival,
    specialist_images,
    stretched,
)
from specdistill.artifacts import read_json
from specdistill.config import Config
from specdistill.data import Dataset
from specdistill.errors import SpecdistillError
from specdistill.formatting import md_table, percent
from specdistill.rundir import SPLITS, RunDir


def extra_epochs(images: int, train_size: int) -> int:
    """The specialists' training images in generalist epochs (at least one)."""
    if train_size <= 0:
        raise SpecdistillError("the training split is empty; check data.limit and the data source")
    return max(1, round(images / train_size))


def score_rivals(cfg: Config, data: Dataset, specialist_ids: list[int], progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) both rivals and score them on the held-out and test splits."""
    run = RunDir.of(cfg)
    infos = [read_json(run.specialist_info(m)) for m in specialist_ids]
    images, exact = specialist_images(infos)
    extra = extra_epochs(images, len(data.train))
    epochs = cfg.generalist.train.epochs + extra
    print(f"combine: rivals: the specialists processed {images:,} training images in generalist-sized passes "
          f"({'counted' if exact else 'estimated from rate x time'}) = {extra} generalist epochs; training the "
          f"generalist for {epochs} epochs and one from seed {cfg.seed + 1}")
    longer = ensure_longer_generalist(cfg, data, epochs, progress)
    metrics = read_json(RunDir.meta_in(longer))["metrics"]
    seeds = [cfg.seed, cfg.seed + 1]
    folders = ensure_generalists(cfg, data, seeds, progress)
    return {
        "specialist_images": images, "specialist_images_exact": exact, "train_images": len(data.train),
        "longer": {"epochs": epochs, "extra_epochs": extra, "best_epoch": metrics.get("best_epoch"),
                   "epochs_run": metrics.get("epochs_run"),
                   "patience": stretched(cfg, epochs).generalist.train.patience,
                   **{split: float(metrics[f"{split}_acc"]) for split in SPLITS}},
        "seeds": {"seeds": seeds,
                  **{split: mean_accuracy(folders, split, data.split(split).labels) for split in SPLITS}},
    }


def stale_rivals(cfg: Config, rivals: dict[str, Any]) -> str | None:
    """Why the stored rivals no longer stand for ``cfg`` (a folder gone or trained for another recipe,
    e.g. before the patience was stretched), or None."""
    folders = [longer_rival(cfg, rivals["longer"]["epochs"])] + [seed_rival(cfg, s) for s in rivals["seeds"]["seeds"]]
    stale = [folder for folder, variant in folders if not rival_done(cfg, folder, variant)]
    return f"{stale[0].name}/ is missing or was trained for another recipe" if stale else None


def rival_lines(rivals: dict[str, Any] | None, generalist: dict[str, float], ensemble: dict[str, float],
                split_names: dict[str, str]) -> list[str]:
    """The combine report's section on the rivals (empty when they were not trained)."""
    if not rivals:
        return []
    longer, seeds = rivals["longer"], rivals["seeds"]
    splits = [s for s in SPLITS if s in generalist]
    base = longer["epochs"] - longer["extra_epochs"]
    rows = [["Generalist", f"{base} epochs", *(percent(generalist[s], 2) for s in splits)],
            ["Generalist + specialists (this report's ensemble)", f"+ {longer['extra_epochs']} epochs' worth",
             *(percent(ensemble[s], 2) for s in splits)],
            [f"Generalist trained {longer['epochs']} epochs{_stopping(longer)}", f"+ {longer['extra_epochs']} epochs",
             *(percent(longer[s], 2) for s in splits)],
            [f"Mean of {len(seeds['seeds'])} generalists (seeds {', '.join(map(str, seeds['seeds']))})",
             "+ 1 generalist", *(percent(seeds[s], 2) for s in splits)]]
    how = "counted" if rivals["specialist_images_exact"] else "estimated as images/s x seconds"
    return ["## Compute-matched rivals", "",
            f"The specialists processed {rivals['specialist_images']:,} training images ({how}), "
            f"{longer['extra_epochs']} epochs of the {rivals['train_images']:,}-image training split on networks of "
            "the generalist's size (a wider specialist's image counted by its multiply-adds over the "
            "generalist's). The same compute spent on the generalist instead, on the same examples:", "",
            md_table(["System", "Training compute", *(f"{split_names[s].capitalize()} accuracy" for s in splits)],
                     rows, align="ll" + "r" * len(splits)),
            ""]


def _stopping(longer: dict[str, Any]) -> str:
    """How the longer generalist ended: where it stopped early and which epoch's weights it kept."""
    if not longer.get("patience"):
        return ""
    run = longer.get("epochs_run")
    stopped = f"stopped at epoch {run}, " if run is not None and run < longer["epochs"] else ""
    return f" ({stopped}best epoch {longer.get('best_epoch')}, early-stopping patience {longer['patience']})"
