"""Specialists: Ray's overhead per task, fan-out scaling, and the choices that set the defaults.

Three parts, each printed side by side as ratios (shared, noisy machines: compare within a run):

* ``overhead`` - an empty Ray task against a direct call, and a task that takes the generalist and
  the data arrays from the object store (what a specialist task pays before it starts training);
* ``scaling``  - wall time of S specialists on W workers (the production fan-out, embedded Ray
  with W CPUs) against the ideal ceil(S/W) x one specialist's time measured in-process;
* ``quality``  - on glyphs-latin, held-out numbers for (a) the three dustbin initialisations
  (how closely the untrained specialist's dustbin tracks the generalist's outside mass) and (b)
  training with and without soft targets from the generalist. Early stopping uses one half of
  the held-out split and every number here is measured on the other half.

    python benchmarks/bench_specialists.py [--parts overhead,scaling,quality] [--groups 12]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdistill.config import Config  # noqa: E402
from specdistill.data import load_data  # noqa: E402
from specdistill.data.loading import BatchAugment, train_loader  # noqa: E402
from specdistill.engine import fit, predict_logits  # noqa: E402
from specdistill.models import build_model  # noqa: E402
from specialists.dustbin import specialist_log_probs  # noqa: E402
from specialists.model import fold_logits, make_specialist  # noqa: E402
from specialists.sampler import fold_labels  # noqa: E402
from specialists.train import backbone_features, classifier_from_state, train_one  # noqa: E402


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {gpu}"


# ----------------------------------------------------------------------------------------------
# A generalist, data and groups to work with


def describe(model) -> str:
    if model.name == "mlp":
        return f"mlp {model.hidden}"
    return f"{model.name} depth {model.depth} width {model.width}"


def setup(cfg: Config, num_groups: int, epochs: int) -> dict:
    torch.manual_seed(0)
    ds = load_data(cfg.data, cfg.seed)
    model = build_model(cfg.generalist.model, ds.num_classes, ds.channels, ds.image_size)
    t = time.perf_counter()
    fit(model, train_loader(ds.train, 128, 0), ds.val, cfg.generalist.train.model_copy(update={"epochs": epochs}),
        progress=False, device="cpu", augment=BatchAugment() if cfg.data.augment else None)
    gen_seconds = time.perf_counter() - t
    # held-out halves: A for early stopping / clustering, B for every number reported
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds.val))
    half_a, half_b = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    val_a, val_b = ds.val.subset(half_a), ds.val.subset(half_b)
    groups = confusable_groups(predict_logits(model, val_a.images), num_groups)
    state = {"tensors": {k: v.numpy() for k, v in model.state_dict().items()},
             "meta": {"model": cfg.generalist.model.model_dump(mode="json"), "num_classes": ds.num_classes,
                      "channels": ds.channels, "image_size": ds.image_size, "class_names": ds.class_names}}
    data = {"train_images": ds.train.images, "train_labels": ds.train.labels,
            "val_images": val_a.images, "val_labels": val_a.labels}
    acc = float((predict_logits(model, val_b.images).argmax(1).numpy() == val_b.labels).mean())
    print(f"data: {ds.name}, {len(ds.train)} train / {len(ds.val)} held-out examples; generalist: "
          f"{describe(cfg.generalist.model)}, {ds.num_classes} classes, "
          f"{epochs} epochs in {gen_seconds:.0f} s, held-out (half B) accuracy {acc:.4f}; {len(groups)} groups "
          f"of sizes {[len(g['classes']) for g in groups]}")
    return {"model": model, "state": state, "data": data, "val_b": val_b, "groups": groups, "dataset": ds}


def confusable_groups(logits: torch.Tensor, count: int) -> list[dict]:
    """The paper's recipe in miniature: k-means on the columns of the prediction covariance."""
    from sklearn.cluster import KMeans

    probs = torch.softmax(logits, 1).numpy()
    corr = np.nan_to_num(np.corrcoef(probs.T))
    k = max(2, probs.shape[1] // 8)
    labels = KMeans(k, n_init=3, random_state=0).fit_predict(corr)
    sizes = np.bincount(labels, minlength=k)
    # keep the largest groups between 3 and 20 classes: the ones a specialist can help
    ids = [c for c in np.argsort(-sizes) if 3 <= sizes[c] <= 20][:count]
    return [{"id": i, "classes": np.flatnonzero(labels == c).tolist()} for i, c in enumerate(ids)]


# ----------------------------------------------------------------------------------------------
# Part 1: Ray overhead


def part_overhead(env: dict) -> None:
    import ray

    def noop(*args):
        return 0

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        remote = ray.remote(noop)
        ray.get([remote.remote() for _ in range(20)])                 # start the workers
        n = 300
        t = time.perf_counter()
        for _ in range(n):
            noop()
        direct = (time.perf_counter() - t) / n
        t = time.perf_counter()
        ray.get([remote.remote() for _ in range(n)])
        batched = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(50):
            ray.get(remote.remote())
        serial = (time.perf_counter() - t) / 50
        gen_ref, data_ref = ray.put(env["state"]), ray.put(env["data"])
        size = sum(v.nbytes for v in env["data"].values()) + sum(v.nbytes for v in env["state"]["tensors"].values())
        t = time.perf_counter()
        for _ in range(20):
            ray.get(remote.remote(gen_ref, data_ref))
        with_args = (time.perf_counter() - t) / 20
    finally:
        ray.shutdown()
    print("\n## Ray overhead per task (2 workers, embedded Ray)\n")
    print("| call | time per call | vs direct call |")
    print("|---|---:|---:|")
    print(f"| direct Python call | {direct * 1e6:.2f} us | 1x |")
    print(f"| empty Ray task, 300 in flight | {batched * 1e3:.3f} ms | {batched / direct:,.0f}x |")
    print(f"| empty Ray task, one at a time (submit + get) | {serial * 1e3:.3f} ms | {serial / direct:,.0f}x |")
    print(f"| task reading generalist + data from the object store ({size / 2**20:.0f} MiB, zero-copy) | "
          f"{with_args * 1e3:.3f} ms | {with_args / direct:,.0f}x |")


# ----------------------------------------------------------------------------------------------
# Part 2: S specialists on W workers


def part_scaling(env: dict, cfg: Config, specialists: int) -> None:
    import ray

    from specialists import fanout, store

    # groups of one size, so that every specialist is the same work and ceil(S/W) x one is the ideal
    sizes = [len(g["classes"]) for g in env["groups"]]
    common = max(set(sizes), key=sizes.count)
    groups = [g for g in env["groups"] if len(g["classes"]) == common][:specialists]
    cfg = cfg.model_copy(deep=True)
    cfg.specialists.train.patience = None          # every specialist runs all its epochs: comparable times
    torch.set_num_threads(1)
    t = time.perf_counter()
    train_one(env["state"], groups[0], env["data"], cfg, device="cpu")
    one = time.perf_counter() - t
    torch.set_num_threads(2)
    inputs = {"generalist": env["state"], "generalist_identity": "bench", "groups": groups, "data": env["data"]}
    rows = []
    for workers in (1, 2):
        ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        try:
            for label in ("cold workers", "warm workers"):
                with tempfile.TemporaryDirectory() as tmp:
                    keys = {g["id"]: store.specialist_key(cfg, "bench", g) for g in groups}
                    t = time.perf_counter()
                    fanout._fan_out(cfg, inputs, groups, keys, Path(tmp), False, None)
                    wall = time.perf_counter() - t
                ideal = math.ceil(len(groups) / workers) * one
                rows.append((len(groups), workers, label, wall, ideal))
        finally:
            ray.shutdown()
    print(f"\nload average now {os.getloadavg()[0]:.1f}")
    print(f"\n## {len(groups)} specialists of {common} classes on W workers (one specialist in-process: "
          f"{one:.1f} s, 1 thread)\n")
    print("| S | W | workers | wall time | ideal ceil(S/W) x one | wall / ideal |")
    print("|---:|---:|---|---:|---:|---:|")
    for s, w, label, wall, ideal in rows:
        print(f"| {s} | {w} | {label} | {wall:.1f} s | {ideal:.1f} s | {wall / ideal:.2f} |")


# ----------------------------------------------------------------------------------------------
# Part 3: dustbin initialisation and soft targets, on held-out half B


def _natural_scores(logits: torch.Tensor, gen_logits: torch.Tensor, labels: np.ndarray, classes: list[int],
                    correction: float) -> tuple[float, float]:
    from specialists.dustbin import corrected_log_probs

    idx = torch.as_tensor(classes)
    local = torch.as_tensor(fold_labels(labels, classes))
    log_p = corrected_log_probs(logits, correction)
    gen = torch.log_softmax(fold_logits(gen_logits, idx), 1)
    nll = float(torch.nn.functional.nll_loss(log_p, local))
    mae = float((log_p[:, -1].exp() - gen[:, -1].exp()).abs().mean())
    return nll, mae


def part_quality(env: dict, cfg: Config, soft: list[tuple[float, float]]) -> None:
    gen, val_b, groups = env["model"], env["val_b"], env["groups"]
    train = env["data"]
    gen_logits = predict_logits(gen, val_b.images)
    print(f"\n## Dustbin initialisation: the untrained specialist on held-out half B ({len(groups)} groups)\n")
    print("| init | dustbin prob. vs generalist outside mass (mean abs. diff.) | folded NLL - generalist's |")
    print("|---|---:|---:|")
    feats_cache = {}
    for init in ("constant", "lstsq", "kl"):
        maes, dnll = [], []
        for g in groups:
            inside = np.isin(train["train_labels"], g["classes"])
            rng = np.random.default_rng(g["id"])
            pick = np.concatenate([rng.choice(np.flatnonzero(inside), min(inside.sum(), 1024), replace=False),
                                   rng.choice(np.flatnonzero(~inside), 1024, replace=False)])
            if g["id"] not in feats_cache:
                feats_cache[g["id"]] = backbone_features(gen, train["train_images"][pick], torch.device("cpu"))
            spec = make_specialist(gen, g["classes"], feats_cache[g["id"]], dustbin_init=init)
            nll, mae = _natural_scores(predict_logits(spec, val_b.images), gen_logits, val_b.labels, g["classes"], 0)
            gen_nll = float(torch.nn.functional.nll_loss(
                torch.log_softmax(fold_logits(gen_logits, torch.as_tensor(g["classes"])), 1),
                torch.as_tensor(fold_labels(val_b.labels, g["classes"]))))
            maes.append(mae)
            dnll.append(nll - gen_nll)
        print(f"| {init} | {np.mean(maes):.4f} | {np.mean(dnll):+.4f} |")

    print(f"\n## Soft targets from the generalist folded onto group + dustbin, held-out half B, "
          f"{len(groups)} groups\n")
    arms = {"hard labels only": None, **{f"+ soft targets T={t:g}, alpha={a:g}": (t, a) for t, a in soft}}
    results = {}
    for name, setting in arms.items():
        c = cfg.model_copy(deep=True)
        c.specialists.soft_targets.enabled = setting is not None
        if setting is not None:
            c.specialists.soft_targets.temperature, c.specialists.soft_targets.alpha = setting
        accs, nlls, secs = [], [], []
        for g in groups:
            t = time.perf_counter()
            r = train_one(env["state"], g, train, c, device="cpu")
            secs.append(time.perf_counter() - t)
            spec = classifier_from_state({"tensors": r["tensors"], "meta": r["model_meta"]})
            inside = np.isin(val_b.labels, g["classes"])
            log_p = specialist_log_probs(spec, val_b.images, r["dustbin_correction"])
            local = fold_labels(val_b.labels[inside], g["classes"])
            accs.append(float((log_p[inside][:, :-1].argmax(1).numpy() == local).mean()))
            nlls.append(_natural_scores(torch.log_softmax(log_p, 1), gen_logits, val_b.labels, g["classes"], 0)[0])
        results[name] = (np.array(accs), np.array(nlls), np.mean(secs))
    gen_acc = np.array([float((gen_logits[np.isin(val_b.labels, g["classes"])][:, g["classes"]].argmax(1).numpy()
                               == fold_labels(val_b.labels[np.isin(val_b.labels, g["classes"])], g["classes"])).mean())
                        for g in groups])
    print("| specialists | accuracy within the group | vs generalist | folded NLL (natural mix) | groups better "
          "than hard-only | s / specialist |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| generalist restricted to the group | {gen_acc.mean():.4f} | 1.000 | - | - | - |")
    hard = results["hard labels only"][0]
    for name, (accs, nlls, sec) in results.items():
        better = "-" if name == "hard labels only" else f"{int((accs > hard).sum())}/{len(accs)} " \
                                                        f"(worse {int((accs < hard).sum())})"
        print(f"| {name} | {accs.mean():.4f} | {accs.mean() / gen_acc.mean():.3f} | {nlls.mean():.4f} | {better} "
              f"| {sec:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="overhead,scaling,quality")
    parser.add_argument("--groups", type=int, default=12, help="groups for the quality part")
    parser.add_argument("--specialists", type=int, default=4, help="S for the scaling part")
    parser.add_argument("--generalist-epochs", type=int, default=5)
    parser.add_argument("--specialist-epochs", type=int, default=4,
                        help="more epochs make each task longer, so fixed per-task costs weigh less")
    parser.add_argument("--soft", default="2:0.5,4:0.2", help="soft-target settings T:alpha to compare")
    parser.add_argument("--data", default="glyphs-latin", choices=["glyphs-latin", "synthetic"])
    parser.add_argument("--model", default="resnet8", choices=["mlp", "resnet8"],
                        help="generalist (and so specialist) architecture: resnet_cifar depth 8 width 8, or an MLP")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = {"source": args.data, "copies_per_font": 4} if args.data == "glyphs-latin" else \
        {"source": "synthetic", "num_classes": 200, "group_size": 5, "examples_per_class": 40, "image_size": 16}
    model = {"name": "mlp", "hidden": [512, 512]} if args.model == "mlp" else \
        {"name": "resnet_cifar", "depth": 8, "width": 8}
    cfg = Config.model_validate({
        "device": "cpu", "data": data,
        "generalist": {"model": model, "train": {"lr": 0.05 if args.model == "mlp" else 0.1, "batch_size": 128}},
        "specialists": {"train": {"epochs": args.specialist_epochs, "batch_size": 128, "lr": 0.01, "patience": 2}},
    })
    print(f"# bench_specialists  ({' '.join(sys.argv)})")
    print(f"machine: {machine()}; torch {torch.__version__}; {datetime.date.today()}; load average at start "
          f"{os.getloadavg()[0]:.1f} (other processes share these cores)")
    env = setup(cfg, args.groups, args.generalist_epochs)
    parts = args.parts.split(",")
    if "overhead" in parts:
        part_overhead(env)
    if "scaling" in parts:
        part_scaling(env, cfg, args.specialists)
    if "quality" in parts:
        part_quality(env, cfg, [tuple(map(float, x.split(':'))) for x in args.soft.split(',')])


if __name__ == "__main__":
    main()
