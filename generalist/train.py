"""Stage 1: train the generalist (or import one: ``generalist/importing.py``) and write what the
later stages read.

    python -m generalist.train --config configs/quickstart.yaml [--set generalist.train.epochs=3]

Writes ``<run>/generalist/``: ``model.safetensors``, ``meta.json`` (architecture, classes, metrics),
``preds-val.npy`` / ``preds-test.npy`` (log-probabilities: held-out feeds clustering, test feeds
the final evaluation; ``preds-*-topk.npz`` instead where K is large: ``specdistill/predictions.py``),
``labels-*.npy``, ``class-examples.npy`` (one held-out image per class, for
pictures), ``metrics.jsonl`` and ``done.json``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generalist.importing import import_generalist, imports, library_net, weights_digest
from generalist.rivals import adopt_rival, recipe_fields
from specdistill.artifacts import read_json, write_json, write_npy
from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser
from specdistill.config import Config, ModelConfig, stage_hash
from specdistill.data import Dataset, load_data
from specdistill.data.loading import training_batches
from specdistill.engine import evaluate, fit, resolve_device
from specdistill.errors import exit_on_error
from specdistill.models import Classifier, build_model, count_flops, save_classifier
from specdistill.predictions import choose_form, model_batches, write_predictions
from specdistill.provenance import is_done, mark_done
from specdistill.rundir import SPLITS, RunDir


def class_examples(dataset: Dataset) -> np.ndarray:
    """One held-out image per class (train if the class has none held out), for pictures."""
    images = dataset.val.images
    out = np.zeros((dataset.num_classes, *images.shape[1:]), dtype=np.uint8)
    for split in (dataset.train, dataset.val):  # val last, so it wins
        idx = np.full(dataset.num_classes, -1)
        idx[split.labels[::-1]] = np.arange(len(split.labels))[::-1]
        has = idx >= 0
        out[has] = split.images[idx[has]]
    return out


def train_generalist(cfg: Config, out_dir: str | Path, seed: int | None = None,
                     dataset: Dataset | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one generalist into ``out_dir`` (resuming a checkpoint there) and write its artifacts.

    ``seed`` defaults to ``cfg.seed``; the student stage calls this with other seeds to build an
    ensemble of generalists.
    """
    seed = cfg.seed if seed is None else seed
    out = Path(out_dir)
    dataset = dataset or load_data(cfg.data, cfg.seed)
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    gcfg = cfg.generalist
    stored_form(cfg, dataset)   # a dense request that would not fit is refused before training
    model = build_model(gcfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    loader, augment = training_batches(dataset.train, cfg.data, gcfg.train.batch_size, seed, device=device)
    started = time.perf_counter()
    result = fit(model, loader, dataset.val, gcfg.train, out, seed=seed, desc=f"generalist(seed {seed})",
                 device=device, augment=augment, progress=progress,
                 fingerprint=f"{dataset.name}:{dataset.num_classes}:{len(dataset.train)}")
    extra = {"seed": seed, "metrics": {
        "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
        "stopped_early": result["stopped_early"], "train_seconds": result["train_seconds"],
        "images_per_s": result["images_per_s"], "images_seen": result["images_seen"]}}
    return write_generalist(cfg, out, model, dataset, device, gcfg.model, extra, started)


def write_generalist(cfg: Config, out: Path, model: Classifier, dataset: Dataset, device: torch.device,
                     model_cfg: ModelConfig, extra: dict[str, Any], started: float) -> dict[str, Any]:
    """Evaluate ``model`` on held-out and test data and write every artifact later stages read
    (trained here or imported: ``generalist/importing.py``); returns the meta."""
    batch = cfg.generalist.train.eval_batch_size
    form = stored_form(cfg, dataset)
    model.to(device)
    val = evaluate(model, dataset.val, batch, device)
    test = evaluate(model, dataset.test, batch, device)
    meta = {
        "class_names": dataset.class_names, "num_classes": dataset.num_classes,
        "channels": dataset.channels, "image_size": dataset.image_size,
        "model": model_cfg.model_dump(mode="json"), "seed": cfg.seed,
        "macs": count_flops(model.cpu(), dataset.channels, dataset.image_size),
        "parameters": sum(p.numel() for p in model.parameters()),
        **extra,
        "data": {"source": dataset.name, "train": len(dataset.train), "val": len(dataset.val),
                 "test": len(dataset.test), **{k: v for k, v in dataset.meta.items() if _small(v)}},
    }
    meta["metrics"] = {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                       "test_loss": test["loss"], **extra.get("metrics", {}),
                       "seconds": time.perf_counter() - started}
    model.to(device)
    for split in SPLITS:
        part = dataset.split(split)
        write_predictions(out, split, model_batches(model, part.images, batch, device), len(part),
                          dataset.num_classes, form, cfg.generalist.predictions_top_k)
        write_npy(RunDir.labels_in(out, split), part.labels)
    write_npy(RunDir.class_examples_in(out), class_examples(dataset))
    save_classifier(RunDir.weights_in(out), model.cpu(), meta)
    write_json(RunDir.meta_in(out), meta)
    return meta


def stored_form(cfg: Config, dataset: Dataset) -> str:
    """How the held-out and test predictions are stored (``specdistill.predictions``): dense or top-k."""
    sizes = {split: len(dataset.split(split)) for split in SPLITS}
    return choose_form(cfg.generalist, sizes, dataset.num_classes)


def _small(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or (isinstance(value, (list, dict)) and len(value) <= 64)


def run_generalist(cfg: Config, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The pipeline's stage 1: skipped when it already finished with the same config hash."""
    prepare_run_dir(cfg, force)
    run = RunDir.of(cfg)
    out = run.generalist
    digest = stage_hash(cfg, "generalist")
    importing = imports(cfg)
    if not force and is_done(run.root, "generalist", digest):
        meta = read_json(run.generalist_meta)
        recorded = meta.get("imported", {}).get("sha256")
        if not importing or recorded == weights_digest(cfg):
            print(f"generalist: already {'imported' if importing else 'trained'} in {out} (config hash {digest}); "
                  f"test accuracy {meta['metrics']['test_acc']:.4f}. Use --force to redo it.")
            return meta
        print(f"generalist: {cfg.generalist.weights} changed since it was imported; importing it again")
    if not force and adopt_rival(cfg):   # this recipe was trained already, as one of combine.rivals
        meta, how = read_json(run.generalist_meta), "adopted"
    else:
        loaded = library_net(cfg) if importing else None   # bad weights stop before any image is read
        dataset = load_data(cfg.data, cfg.seed)
        stored_form(cfg, dataset)   # a dense request that would not fit stops here, before anything changes
        if force or run.done("generalist").exists():  # a finished stage from another config: start over
            shutil.rmtree(out, ignore_errors=True)
        meta = (import_generalist(cfg, out, dataset, loaded) if importing
                else train_generalist(cfg, out, dataset=dataset, progress=progress))
        how = f"imported {meta['model']['name']} from {meta['imported']['weights']}" if importing else "trained"
    mark_done(run.root, "generalist", digest, test_acc=meta["metrics"]["test_acc"],
              **({} if importing else recipe_fields(cfg)))
    m = meta["metrics"]
    print(f"generalist: {how}; {meta['num_classes']} classes, val accuracy {m['val_acc']:.4f}, "
          f"test accuracy {m['test_acc']:.4f} ({m['seconds']:.0f} s) -> {out}")
    return meta


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    args = stage_parser("Stage 1: train the generalist on every class.").parse_args(argv)
    run_generalist(config_from_args(args), force=args.force)


if __name__ == "__main__":
    main()
