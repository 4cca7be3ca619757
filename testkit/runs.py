"""Run directories as stages 1-2 leave them, made inside a test: a small generalist trained on the
config's data, and clusters.json with the data's planted look-alike groups (or the ones given)."""

from __future__ import annotations

import os

import torch

from specdistill.artifacts import write_json
from specdistill.config import Config
from specdistill.data import load_data
from specdistill.data.loading import train_loader
from specdistill.engine import fit
from specdistill.models import build_model, save_classifier
from specdistill.records import Clusters, Group
from specdistill.rundir import RunDir


def write_generalist_and_groups(cfg: Config, run_dir: str | os.PathLike, epochs: int,
                                groups: list[list[int]] | None = None) -> None:
    """Train ``cfg``'s generalist for ``epochs`` on its data (seeded) and write it, its meta.json and
    clusters.json into ``run_dir``: what the specialists stage reads."""
    ds = load_data(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg.generalist.model, ds.num_classes, ds.channels, ds.image_size)
    fit(model, train_loader(ds.train, 64, 0), ds.val, cfg.generalist.train.model_copy(update={"epochs": epochs}),
        progress=False, device="cpu")
    meta = {"class_names": ds.class_names, "num_classes": ds.num_classes, "channels": ds.channels,
            "image_size": ds.image_size, "model": cfg.generalist.model.model_dump(mode="json")}
    run = RunDir.at(run_dir)
    save_classifier(run.generalist_weights, model, meta)
    write_json(run.generalist_meta, meta)
    groups = groups or ds.meta["groups"]
    Clusters(ds.num_classes, ds.class_names,
             [Group(m, list(g), [ds.class_names[c] for c in g]) for m, g in enumerate(groups)]).write(run.clusters)
