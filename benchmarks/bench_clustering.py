"""Clustering benchmarks: scale (top-k + sketch vs exact dense), matrix choice, backends.

    python benchmarks/bench_clustering.py scale       # K=15,000 x N=200,000, and dense side by side
    python benchmarks/bench_clustering.py matrices    # which matrix recovers planted groups (ARI)
    python benchmarks/bench_clustering.py backends    # sklearn / minibatch / faiss: ARI and time
    python benchmarks/bench_clustering.py run-dir runs/x   # matrices on a real run's held-out split
    python benchmarks/bench_clustering.py temperatures runs/x --config configs/hanzi-1k.yaml \\
        --temperatures 1 2 3 4 6 --k 40 100            # clustering.temperature for a confident generalist

Synthetic predictions come from ``testkit.synthetic_predictions`` (planted groups, class
frequencies spread log-normally). Times are wall-clock on a shared machine: compare the ratios
printed side by side in one run, not the absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.cluster import cluster_classes  # noqa: E402
from clustering.matrices import MATRIX_KINDS  # noqa: E402
from clustering.predictions import check_dense, check_sparse, soften  # noqa: E402
from specdistill.config import load_config  # noqa: E402
from specdistill.predictions import StoredPredictions  # noqa: E402
from specdistill.rundir import RunDir  # noqa: E402
from testkit.synthetic_predictions import make_synthetic_predictions  # noqa: E402

DEFAULT_MATRIX = "correlation+offdiag+normalized"


def timed(fn, *args, **kwargs):
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - began


def scale(args: argparse.Namespace) -> None:
    """Dense exact vs top-k + sketch at sizes where both run, then the scalable path at the target
    size; the dense time there is extrapolated with a power law fitted to the measured sizes that
    have the target's rows per class."""
    rows_per_class = args.examples / args.classes
    cfg = dict(matrix=args.matrix, backend=args.backend, n_init=args.n_init, progress=False)
    print(f"## scale: matrix={args.matrix}, backend={args.backend}, n_init={args.n_init}, "
          f"planted groups of {args.group_size}, {rows_per_class:.1f} rows per class, "
          f"top_k={args.top_k}, sketch_dim={args.sketch_dim}\n")
    print(f"each row: mean (min) over data seeds {args.seeds}\n")
    print("| K | N | k | dense s | top-k+sketch s | ratio dense/sketch | ARI sketch vs dense "
          "| ARI dense vs dense(k-means seed+1) | ARI planted: dense / sketch |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense_times = []
    for pair in args.compare:
        num_classes, n = map(int, pair.split(":"))
        k = num_classes // args.group_size
        rows: dict[str, list[float]] = {name: [] for name in
                                        ("dense_s", "sketch_s", "agree", "floor", "dense_p", "sketch_p")}
        for seed in args.seeds:
            synth = make_synthetic_predictions(num_classes, n, args.group_size, mates_per_row=args.mates,
                                               dense=True, seed=seed)
            dense, dense_s = timed(cluster_classes, synth.probs, k, seed=0, **cfg)
            dense_other = cluster_classes(synth.probs, k, seed=1, **cfg)
            # the scalable path includes cutting each row to its top-k (what --top-k does to a file)
            (topk, _), cut_s = timed(check_dense, synth.probs, "synthetic", args.top_k, False)
            sketch, sketch_s = timed(cluster_classes, topk, k, seed=0, sketch_dim=args.sketch_dim, **cfg)
            rows["dense_s"].append(dense_s)
            rows["sketch_s"].append(sketch_s + cut_s)
            rows["agree"].append(adjusted_rand_score(dense.labels, sketch.labels))
            rows["floor"].append(adjusted_rand_score(dense.labels, dense_other.labels))
            rows["dense_p"].append(adjusted_rand_score(synth.group_of, dense.labels))
            rows["sketch_p"].append(adjusted_rand_score(synth.group_of, sketch.labels))
            del synth, dense, dense_other, topk

        def cell(name: str, rows: dict = rows) -> str:
            return f"{np.mean(rows[name]):.3f} ({np.min(rows[name]):.3f})"

        dense_s, sketch_s = float(np.mean(rows["dense_s"])), float(np.mean(rows["sketch_s"]))
        if n * args.classes == num_classes * args.examples:      # same rows per class as the target
            dense_times.append((num_classes, dense_s))
        print(f"| {num_classes} | {n} | {k} | {dense_s:.1f} | {sketch_s:.1f} | {dense_s / sketch_s:.1f}x "
              f"| {cell('agree')} | {cell('floor')} | {cell('dense_p')} / {cell('sketch_p')} |", flush=True)

    k = args.classes // args.group_size
    synth, gen_s = timed(make_synthetic_predictions, args.classes, args.examples, args.group_size,
                         mates_per_row=args.mates, seed=args.seed)
    topk, cut_s = timed(check_sparse, synth.probs, "synthetic", args.top_k)
    result, sketch_s = timed(cluster_classes, topk, k, seed=0, sketch_dim=args.sketch_dim, **cfg)
    sketch_s += cut_s
    (k_small, t_small), (k_big, t_big) = dense_times[0], dense_times[-1]
    power = np.log(t_big / t_small) / np.log(k_big / k_small) if k_big != k_small else 3.0
    dense_est = t_big * (args.classes / k_big) ** power
    dense_est3 = t_big * (args.classes / k_big) ** 3
    print(f"\ntarget: K={args.classes}, N={args.examples}, k={k}, nnz={synth.probs.nnz} "
          f"(generated in {gen_s:.1f}s, not counted)")
    print(f"top-k+sketch path: {sketch_s:.1f}s (matrix {result.timings['matrix_s']:.1f}s, "
          f"k-means {result.timings['kmeans_s']:.1f}s); ARI vs planted "
          f"{adjusted_rand_score(synth.group_of, result.labels):.3f}")
    print(f"dense path at the target: not run (the dense predictions alone are "
          f"{args.classes * args.examples * 4 / 2**30:.0f} GiB); extrapolated from K={k_small}..{k_big} "
          f"with the fitted power K^{power:.2f}: {dense_est:.0f}s = {dense_est / sketch_s:.0f}x the "
          f"sketch path (with the O(N K^2) = K^3 law: {dense_est3:.0f}s = {dense_est3 / sketch_s:.0f}x)")


def matrices(args: argparse.Namespace) -> None:
    """Planted-group ARI of every matrix kind, exact dense path, over frequency spreads and seeds."""
    kinds = args.kinds or list(MATRIX_KINDS)
    print(f"## matrices: K={args.classes}, N={args.examples}, planted groups of {args.group_size}, "
          f"{args.mates} mates per row, backend={args.backend}, n_init={args.n_init}, "
          f"seeds {args.seeds}; mean (min) ARI vs the planted groups\n")
    print("| frequency spread | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for spread in args.spreads:
        scores: dict[str, list[float]] = {kind: [] for kind in kinds}
        for seed in args.seeds:
            synth = make_synthetic_predictions(args.classes, args.examples, args.group_size,
                                               mates_per_row=args.mates, frequency_spread=spread,
                                               dense=True, seed=seed)
            k = synth.num_groups
            for kind in kinds:
                result = cluster_classes(synth.probs, k, matrix=kind, backend=args.backend, seed=seed,
                                         n_init=args.n_init, progress=False)
                scores[kind].append(adjusted_rand_score(synth.group_of, result.labels))
        cells = [f"{np.mean(v):.3f} ({np.min(v):.2f})" for v in scores.values()]
        print(f"| {spread} | " + " | ".join(cells) + " |", flush=True)


def backends(args: argparse.Namespace) -> None:
    """Every k-means backend on the same points: planted ARI, time, and same-seed determinism."""
    synth = make_synthetic_predictions(args.classes, args.examples, args.group_size,
                                       mates_per_row=args.mates, seed=args.seed)
    k = synth.num_groups
    sketch = args.sketch_dim if args.sketch_dim and args.sketch_dim < args.classes else None
    print(f"## backends: K={args.classes}, N={args.examples}, k={k}, matrix={args.matrix}, "
          f"sketch_dim={sketch}, n_init={args.n_init}\n")
    print("| backend | seconds (k-means only) | ARI vs planted | same seed, same groups |")
    print("|---|---|---|---|")
    for backend in ("sklearn", "minibatch", "faiss"):
        runs = [cluster_classes(synth.probs, k, matrix=args.matrix, backend=backend, seed=0,
                                n_init=args.n_init, sketch_dim=sketch, progress=False) for _ in range(2)]
        same = all(np.array_equal(g1, g2) for g1, g2 in zip(runs[0].groups, runs[1].groups))
        print(f"| {backend} | {runs[0].timings['kmeans_s']:.1f} "
              f"| {adjusted_rand_score(synth.group_of, runs[0].labels):.3f} | {same} |", flush=True)


def _held_out(path: str) -> tuple[RunDir, np.ndarray | sp.csr_matrix, np.ndarray]:
    """A run's held-out generalist probabilities (dense, or CSR of the top-k form) and labels."""
    run = RunDir.at(path)
    stored = StoredPredictions.open(run.generalist, "val")
    labels = np.load(run.generalist_labels("val"), allow_pickle=False)
    probs = (check_dense(stored.dense(), stored.path.name, None, False)[0] if stored.form == "dense"
             else check_sparse(stored.sparse_probs(), stored.path.name))
    return run, probs, labels


def _members(groups: list[np.ndarray], num_classes: int) -> np.ndarray:
    member = np.zeros((len(groups), num_classes), dtype=bool)
    for m, group in enumerate(groups):
        member[m, group] = True
    return member


def _caught(groups: list[np.ndarray], probs, labels: np.ndarray) -> float:
    """Share of the generalist's errors whose true and predicted class share a group."""
    member = _members(groups, probs.shape[1])
    predicted = np.asarray(probs.argmax(1)).ravel()
    wrong = predicted != labels
    return float((member[:, labels[wrong]] & member[:, predicted[wrong]]).any(0).mean()) if wrong.any() \
        else float("nan")


def run_dir(args: argparse.Namespace) -> None:
    """Which matrix gives groups that hold the generalist's held-out errors: an error whose true and
    predicted class share a group: only those can a specialist fix. A proxy until specialists are trained per matrix."""
    run, probs, labels = _held_out(args.path)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    kinds = args.kinds or list(MATRIX_KINDS)
    print(f"## run-dir {run}: k={args.k}, size={args.size}; 2-fold over the held-out split "
          f"({len(labels)} rows, {probs.shape[1]} classes)\n")
    print("| matrix | errors inside one group (mean of 2 folds) | mean group size | uncovered classes |")
    print("|---|---|---|---|")
    for kind in kinds:
        caught, sizes, uncovered = [], [], []
        for build, score in (halves, halves[::-1]):
            result = cluster_classes(probs[build], args.k, matrix=kind, backend=args.backend,
                                     seed=args.seed, size=args.size, min_size=2, progress=False)
            caught.append(_caught(result.groups, probs[score], labels[score]))
            sizes.append(np.mean([len(g) for g in result.groups]))
            uncovered.append(result.coverage["uncovered"])
        print(f"| {kind} | {np.nanmean(caught):.3f} | {np.mean(sizes):.1f} | {np.mean(uncovered):.0f} |",
              flush=True)


def temperatures(args: argparse.Namespace) -> None:
    """The groups k-means finds in a run's held-out predictions softened at each temperature, with the
    rest of the clustering settings from ``--config`` (as ``python -m clustering.build --temperature T``
    would build them): a near one-hot generalist leaves most classes without a confusion signal and
    k-means then puts them in a few giant groups (dropped by max_size, left to the generalist). The
    last columns are the proxy that chose hanzi-1k's T = 2: the share of the generalist's held-out
    errors whose true and predicted class share a group, on the rows clustered and, 2-fold, on rows not."""
    cfg = load_config(args.config)
    ccfg = cfg.clustering
    run, probs, labels = _held_out(args.path)
    num_classes = probs.shape[1]
    seed = args.seed if args.seed is not None else (cfg.seed if ccfg.seed is None else ccfg.seed)
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    size = ccfg.size if args.size is None else (args.size or None)
    print(f"## temperatures {run.root}: {len(labels)} held-out rows, {num_classes} classes; matrix={ccfg.matrix}, "
          f"min_size={ccfg.min_size}, max_size={ccfg.max_size}, size={size}, seed={seed}\n")
    print("| T | k | groups kept | dropped as too large (classes) | largest kept | median | classes covered | "
          "errors inside one group | the same, 2-fold |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def build(rows, k):
        return cluster_classes(rows, k, matrix=ccfg.matrix, backend=ccfg.backend, seed=seed, n_init=ccfg.n_init,
                               max_iter=ccfg.max_iter, size=size, min_size=ccfg.min_size, max_size=ccfg.max_size,
                               progress=False)

    for temperature in args.temperatures:
        soft = soften(probs, temperature)
        for k in args.k:
            result = build(soft, k)
            cores = sorted((len(c) for c in result.cores), reverse=True)
            kmeans_sizes = np.bincount(result.labels, minlength=k)
            too_large = kmeans_sizes[kmeans_sizes > ccfg.max_size] if ccfg.max_size else kmeans_sizes[:0]
            covered = int(_members(result.groups, num_classes).any(0).sum())
            folds = [_caught(build(soft[a], k).groups, soft[b], labels[b]) for a, b in (halves, halves[::-1])]
            print(f"| {temperature:g} | {k} | {len(cores)} | {len(too_large)} ({int(too_large.sum())}) | {cores[0]} | "
                  f"{np.median(cores):.0f} | {covered} | {_caught(result.groups, soft, labels):.1%} | "
                  f"{np.nanmean(folds):.1%} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("scale")
    p.add_argument("--classes", type=int, default=15_000)
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--compare", nargs="+", default=["1500:20000", "3000:40000", "2000:80000"],
                   help="K:N sizes where the dense path runs too (those with the target's rows per "
                        "class also extrapolate the dense time)")
    p.add_argument("--group-size", type=int, default=50)
    p.add_argument("--mates", type=int, default=8)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--sketch-dim", type=int, default=256)
    p.add_argument("--matrix", default=DEFAULT_MATRIX)
    p.add_argument("--backend", default="faiss")
    p.add_argument("--n-init", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.set_defaults(fn=scale)
    p = sub.add_parser("matrices")
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--examples", type=int, default=12_000)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--mates", type=int, default=6)
    p.add_argument("--spreads", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", choices=MATRIX_KINDS)
    p.add_argument("--backend", default="sklearn")
    p.add_argument("--n-init", type=int, default=5)
    p.set_defaults(fn=matrices)
    p = sub.add_parser("backends")
    p.add_argument("--classes", type=int, default=3000)
    p.add_argument("--examples", type=int, default=40_000)
    p.add_argument("--group-size", type=int, default=50)
    p.add_argument("--mates", type=int, default=8)
    p.add_argument("--sketch-dim", type=int, default=256)
    p.add_argument("--matrix", default=DEFAULT_MATRIX)
    p.add_argument("--n-init", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(fn=backends)
    p = sub.add_parser("run-dir")
    p.add_argument("path")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--size", type=int)
    p.add_argument("--kinds", nargs="+", choices=MATRIX_KINDS)
    p.add_argument("--backend", default="sklearn")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=run_dir)
    p = sub.add_parser("temperatures")
    p.add_argument("path", help="a run directory whose generalist stage is done")
    p.add_argument("--config", required=True, help="clustering settings (matrix, sizes, backend) of this config")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0])
    p.add_argument("--k", type=int, nargs="+", default=[40])
    p.add_argument("--size", type=int, help="grow groups to this size (0: not grown; default: the config's)")
    p.add_argument("--seed", type=int)
    p.set_defaults(fn=temperatures)
    args = parser.parse_args(argv)
    print(f"$ python benchmarks/bench_clustering.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    args.fn(args)


if __name__ == "__main__":
    main()
