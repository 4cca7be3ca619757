"""Stage 2: ``python -m clustering.build --k 300`` -> ``<run>/clustering/clusters.json`` + pictures.

Reads the generalist's held-out log-probabilities from the run directory (or any N x K predictions
file given with ``--probs``), clusters the columns of the chosen covariance-derived matrix with
k-means, sizes and overlaps the groups, and writes ``clusters.json``, ``covariance.png`` and
``groups.png`` and finally ``done.json``. Every input is checked before anything is written, so a bad
input leaves the run directory as it was.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from clustering.cluster import ClusterResult, cluster_classes
from clustering.plots import groups_figure, matrix_figure, save_figure
from clustering.predictions import Predictions, is_topk_store, load_predictions, soften
from specdistill.artifacts import read_json, read_npy
from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser
from specdistill.config import Config, apply_flags, stage_hash
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.hashing import digest_file
from specdistill.owner import lock
from specdistill.predictions import StoredPredictions
from specdistill.provenance import is_done, mark_done, require_done
from specdistill.records import Clusters, Group
from specdistill.rundir import RunDir

STAGE = "clustering"
AUTO_TOP_K, AUTO_SKETCH_DIM = 32, 256


def run_clustering(cfg: Config, *, probs_path: str | Path | None = None,
                   names_path: str | Path | None = None, force: bool = False,
                   record_config: bool = False, progress: bool = True) -> Clusters:
    """Build the confusable groups for ``cfg``'s run directory and return them (``clusters.json``).

    Skipped (returning the existing clusters.json) when the stage already finished with the same
    config hash and the same input file, unless ``force``. ``probs_path`` replaces the generalist's
    ``preds-val.npy`` (then names come from ``names_path``, a JSON list, or are "class i").
    """
    began = time.perf_counter()
    run = RunDir.of(cfg)
    config_hash = stage_hash(cfg, STAGE)
    for flag, given in (("--probs", probs_path), ("--names", names_path)):
        if given is not None and Path(given).exists() and not Path(given).is_file():
            raise SpecdistillError(f"{flag} {given} is a folder; pass the file itself"
                                   + (" (N x K predictions, .npy or .npz)" if flag == "--probs" else ""))
    source = Path(probs_path) if probs_path else _generalist_source(run)
    fingerprint = _fingerprint(source, names_path)
    if not force and is_done(run.root, STAGE, config_hash) and run.clusters.exists():
        done = read_json(run.done(STAGE))
        if done.get("input") == fingerprint:
            print(f"clustering: already done in {run.clustering} with this config (hash {config_hash}); "
                  "skipping (use --force to redo)")
            return Clusters.read(run.clusters)

    # ---- read and check every input before writing anything
    ccfg = cfg.clustering
    seed = cfg.seed if ccfg.seed is None else ccfg.seed
    if probs_path is None:
        require_done(run.root, "generalist", stage_hash(cfg, "generalist"))
    num_classes = _peek_num_classes(source)
    top_k, sketch_dim = ccfg.top_k, ccfg.sketch_dim
    if num_classes > ccfg.auto_scale_classes and top_k is None and sketch_dim is None:
        top_k, sketch_dim = AUTO_TOP_K, AUTO_SKETCH_DIM
        print(f"clustering: {num_classes} classes > auto_scale_classes={ccfg.auto_scale_classes}: "
              f"using the scalable path (top_k={top_k}, sketch_dim={sketch_dim})")
    if ccfg.k > num_classes:   # before reading a possibly huge file
        raise SpecdistillError(f"k={ccfg.k} is larger than the number of classes ({num_classes}) in "
                               f"{source}; choose --k {num_classes} or fewer")
    t0 = time.perf_counter()
    preds = load_predictions(source, top_k=top_k, progress=progress)
    if ccfg.temperature is not None:
        preds.probs = soften(preds.probs, ccfg.temperature)
    load_s = time.perf_counter() - t0
    class_names = _class_names(run, preds, probs_path, names_path)
    examples = _class_examples(run, preds.num_classes) if probs_path is None else None

    result = cluster_classes(preds.probs, ccfg.k, matrix=ccfg.matrix, backend=ccfg.backend, seed=seed,
                             n_init=ccfg.n_init, max_iter=ccfg.max_iter, sketch_dim=sketch_dim,
                             size=ccfg.size, min_size=ccfg.min_size, max_size=ccfg.max_size, progress=progress)
    t0 = time.perf_counter()
    figures = {
        "covariance": matrix_figure(result.matrix, result.cores, class_names, seed=seed),
        "groups": groups_figure(result.groups, result.cores, result.points, class_names, examples),
    }
    plots_s = time.perf_counter() - t0

    # ---- write: pictures, clusters.json, then done.json last
    run.done(STAGE).unlink(missing_ok=True)
    if record_config:
        prepare_run_dir(cfg, force)
    t0 = time.perf_counter()
    for name, fig in figures.items():
        save_figure(fig, run.clustering_figure(name))
    plots_s += time.perf_counter() - t0
    timings = {"load_s": load_s, **result.timings, "plots_s": plots_s,
               "total_s": time.perf_counter() - began}
    params = {"k": ccfg.k, "backend": ccfg.backend, "matrix": ccfg.matrix, "size": ccfg.size,
              "min_size": ccfg.min_size, "max_size": ccfg.max_size,
              "temperature": ccfg.temperature, "top_k": top_k, "sketch_dim": sketch_dim,
              "seed": seed, "n_init": ccfg.n_init, "max_iter": ccfg.max_iter}
    clusters = clusters_json(result, class_names, preds, params, timings)
    clusters.write(run.clusters)
    # read from the generalist's predictions, or from the user's own file (its fingerprint is `input`)
    mark_done(run.root, STAGE, config_hash, inputs=None if probs_path is None else {}, input=fingerprint)
    _print_summary(clusters, run)
    return clusters


def clusters_json(result: ClusterResult, class_names: list[str], preds: Predictions, params: dict,
                  timings: dict) -> Clusters:
    """The run-directory contract: groups with class ids and names, parameters, coverage."""
    groups = []
    for m, (group, core) in enumerate(zip(result.groups, result.cores)):
        ids = [int(c) for c in group]
        groups.append(Group(m, ids, [class_names[c] for c in ids], num_core=len(core)))
    details = {
        "matrix": params["matrix"],
        "params": params,
        "input": {"source": preds.source, "num_examples": preds.num_examples,
                  "log_probabilities": preds.was_log,
                  "path": "top-k + sketch" if params["sketch_dim"] else "exact"},
        "kmeans": {"inertia": result.inertia, "clusters": len(result.cores) + result.dropped,
                   "dropped_small": result.dropped, "dropped_large": result.dropped_large},
        "coverage": result.coverage,
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    return Clusters(preds.num_classes, list(class_names), groups, details)


def _large(details: dict) -> str:
    n = details["kmeans"].get("dropped_large", 0)
    return f", {n} larger than max_size={details['params']['max_size']} left to the generalist" if n else ""


def _softened(details: dict) -> str:
    temperature = details["params"].get("temperature")
    return f" of the predictions softened at T={temperature:g}" if temperature is not None else ""


def _print_summary(clusters: Clusters, run: RunDir) -> None:
    d = clusters.details
    cov, sizes = d["coverage"], d["coverage"]["group_sizes"]
    hist = ", ".join(f"{n}: {c}" for n, c in cov["histogram"].items())
    print(f"clustering: {len(clusters.groups)} groups of {sizes['min']}-{sizes['max']} classes "
          f"(mean {sizes['mean']:.1f}; {d['kmeans']['dropped_small']} smaller than min_size "
          f"dropped{_large(d)}) over {clusters.num_classes} classes, matrix={d['matrix']}{_softened(d)}, "
          f"{d['timings']['total_s']:.1f}s")
    print(f"clustering: classes covered by n groups -> {hist}")
    figures = ", ".join(run.clustering_figure(name).name for name in ("covariance", "groups"))
    print(f"clustering: wrote {run.clusters}, {figures}")


# ---------------------------------------------------------------------------------------------- inputs


def _fingerprint(source: Path, names_path: str | Path | None) -> dict:
    def one(path: Path) -> dict | None:
        if not path.exists():
            return None
        # by content: a copied or moved run directory still matches (a top-k file's zip entries carry
        # timestamps, so it is named by its arrays)
        digest = (StoredPredictions.read_topk(path).content_digest() if is_topk_store(path)
                  else digest_file(path))
        return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest}

    return {"predictions": one(source), "names": one(Path(names_path)) if names_path else None}


def _generalist_source(run: RunDir) -> Path:
    """The generalist's held-out predictions file: dense, or the top-k form where K is large."""
    dense, topk = run.generalist_preds("val"), RunDir.topk_preds_in(run.generalist, "val")
    return topk if topk.exists() and not dense.exists() else dense


def _peek_num_classes(source: Path) -> int:
    if not source.exists():
        raise SpecdistillError(f"predictions file {source} not found; run the generalist stage first "
                               "or pass --probs FILE.npy")
    if is_topk_store(source):
        return StoredPredictions.read_topk(source).num_classes
    if source.suffix == ".npz":   # scipy.sparse.save_npz stores the shape beside the arrays
        try:
            with np.load(source, allow_pickle=False) as stored:
                shape = tuple(int(n) for n in stored["shape"])
        except (ValueError, OSError, KeyError) as exc:
            raise SpecdistillError(f"{source} is not a scipy sparse .npz ({exc}); save top-k "
                                   "probabilities with scipy.sparse.save_npz, or pass a dense .npy") from None
    else:
        shape = read_npy(source, mmap=True).shape
    if len(shape) != 2:
        raise SpecdistillError(f"{source} has shape {tuple(shape)}; expected [N, K]: one row per held-out "
                               "example, one column per class")
    return int(shape[1])


def _class_names(run: RunDir, preds: Predictions, probs_path, names_path) -> list[str]:
    k = preds.num_classes
    if names_path is not None:
        names = read_json(names_path)
        where = str(names_path)
    elif probs_path is not None:
        return [f"class {i}" for i in range(k)]
    else:
        names = read_json(run.generalist_meta).get("class_names")
        where = str(run.generalist_meta)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SpecdistillError(f"{where} must hold a JSON list of class names (strings)")
    if len(names) != k:
        raise SpecdistillError(f"{where} lists {len(names)} class names but the predictions have {k} "
                               "columns; pass the names that belong to these predictions")
    return names


def _class_examples(run: RunDir, num_classes: int) -> np.ndarray | None:
    path = run.class_examples
    if not path.exists():
        return None
    images = read_npy(path)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != num_classes:
        raise SpecdistillError(f"{path} has shape {images.shape} ({images.dtype}); expected uint8 "
                               f"[{num_classes}, H, W] or [{num_classes}, H, W, C]: rerun the generalist stage")
    return images


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = stage_parser("Confusable class groups from the covariance of the generalist's held-out "
                          "predictions (paper section 5.3).")
    parser.add_argument("--k", help="number of k-means clusters (groups before dropping/growing)")
    parser.add_argument("--probs", help="your own predictions: N x K probabilities or log-probabilities "
                                        "(.npy), or a scipy CSR of top-k probabilities (.npz)")
    parser.add_argument("--names", help="JSON list of K class names for --probs (default: 'class i')")
    parser.add_argument("--backend", help="k-means backend: sklearn, minibatch (online) or faiss")
    parser.add_argument("--matrix", help="covariance, correlation, offdiag, normalized, or a '+' "
                                         "combination, e.g. correlation+offdiag+normalized")
    parser.add_argument("--size", help="grow every group to this many classes (overlapping groups)")
    parser.add_argument("--min-size", help="drop k-means groups with fewer classes than this")
    parser.add_argument("--max-size", help="drop k-means groups with more classes than this (they stay with the "
                        "generalist: a giant group is the classes it never confuses)")
    parser.add_argument("--temperature", help="soften the predictions, softmax(logits / T), before the matrix: "
                        "T = 2 finds groups where a well-trained generalist's rows are near one-hot")
    parser.add_argument("--top-k", help="keep each row's top-k probabilities (sparse path)")
    parser.add_argument("--sketch-dim", help="cluster a Gaussian sketch of this many dimensions")
    parser.add_argument("--seed", help="k-means seed (default: the experiment seed)")
    return parser


_FLAG_KEYS = {"k": "k", "backend": "backend", "matrix": "matrix", "size": "size", "min_size": "min_size",
              "max_size": "max_size", "temperature": "temperature", "top_k": "top_k", "sketch_dim": "sketch_dim",
              "seed": "seed"}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    args = _parser().parse_args(argv)
    if args.config is None and args.run_dir and RunDir.at(args.run_dir).config.exists():
        args.config = str(RunDir.at(args.run_dir).config)   # the run's resolved config
    flags = {f"clustering.{key}": (f"--{attr.replace('_', '-')}", getattr(args, attr))
             for attr, key in _FLAG_KEYS.items() if getattr(args, attr) is not None}
    cfg = apply_flags(config_from_args(args), flags)   # a bad --k is blamed on --k, not the config file
    if args.names and not args.probs:
        raise SpecdistillError("--names goes with --probs; a run directory's names come from its meta.json")
    if RunDir.of(cfg).root.is_dir():   # one process at a time in a run directory (a new one is claimed on write)
        lock(RunDir.of(cfg))
    run_clustering(cfg, probs_path=args.probs, names_path=args.names, force=args.force,
                   record_config=True)


if __name__ == "__main__":
    main()
