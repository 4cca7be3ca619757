"""Distilling through a small transfer set: soft targets as a regulariser (paper section 6) and a
synthetic transfer set (Bucilua, Caruana & Niculescu-Mizil 2006, "Model compression").

Both start from the same small labelled set: a stratified ``paper.small_fraction`` of the training
split (the paper's 3%). Paper, speech frame accuracy: 58.9% for the baseline on all the data, 44.5%
with hard labels on 3% of it (early-stopped, it overfits badly), 57.0% with the baseline's soft
targets on the same 3% (no early stopping needed).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from paper.lab import Lab, Result, Run, choose, describe, summary
from specdistill.data import Split
from specdistill.errors import SpecdistillError
from specdistill.formatting import md_table, percent


def small_subset(lab: Lab) -> Split:
    """A stratified ``small_fraction`` of the training split, the same for a seed."""
    train, k = lab.data.train, lab.data.num_classes
    n = int(round(lab.paper.small_fraction * len(train)))
    if n < 2 * k:
        raise SpecdistillError(f"paper.small_fraction={lab.paper.small_fraction:g} leaves {n} of {len(train)} "
                               f"training examples, fewer than two per class; raise it")
    keep, _ = train_test_split(np.arange(len(train)), train_size=n, stratify=train.labels,
                               random_state=lab.cfg.seed)
    return train.subset(np.sort(keep))


def _accuracy(run: Run, n: int) -> str:
    return percent(1 - run.test_errors / n)


def soft_candidates(lab: Lab, small: Split) -> dict[float, Run]:
    """The large net's architecture (no dropout) taught by the large net's soft targets on the small set."""
    teacher, p = lab.large_net(), lab.paper
    arch = lab.cfg.generalist.model.model_copy(update={"dropout": 0.0})
    t = lab.cfg.student.loss.temperature
    return {a: lab.train(f"{p.small_fraction:.0%} of the data, soft targets alpha={a:g}", arch, small, p.small_train,
                         teacher=teacher, temperature=t, alpha=a, repeats=p.small_repeats) for a in p.alphas}


def chosen_small_alpha(lab: Lab) -> float:
    """The soft-term weight for a small transfer set, chosen on held-out data by the small-data
    experiment and reused by the synthetic-transfer one."""
    if "small_alpha" not in lab.memo:
        lab.memo["small_alpha"] = choose(soft_candidates(lab, small_subset(lab)))
    return lab.memo["small_alpha"]


def small_data(lab: Lab) -> Result:
    """Hard labels vs the large net's soft targets on a small share of the training data."""
    p, n_test = lab.paper, len(lab.data.test)
    small = small_subset(lab)
    baseline = lab.large_net()
    arch = lab.cfg.generalist.model.model_copy(update={"dropout": 0.0})
    hard = lab.train(f"{p.small_fraction:.0%} of the data, hard labels", arch, small, p.small_train,
                     repeats=p.small_repeats)
    candidates = soft_candidates(lab, small)
    alpha = chosen_small_alpha(lab)
    soft = candidates[alpha]

    def row(what: str, run: Run, data: str, paper: str) -> list:
        curve = run.info["val_acc"]
        best = run.info["best_epoch"]
        return [what, data, f"{percent(curve[best - 1])} (epoch {best})", f"{percent(curve[-1])} ({len(curve)})",
                _accuracy(run, n_test), run.test_errors, paper]

    rows = [row("large net, hard labels (baseline)", baseline, f"all {len(lab.data.train)}", "58.9%"),
            row("same architecture, hard labels", hard, f"{len(small)} ({p.small_fraction:.0%})", "44.5%"),
            row(f"same architecture, soft targets (T={lab.cfg.student.loss.temperature:g}, alpha={alpha:g})",
                soft, f"{len(small)} ({p.small_fraction:.0%})", "57.0%")]
    table = md_table(["model", "training examples", "held-out acc, best (epoch)", "held-out acc, last (epochs)",
                      "test accuracy", f"test errors (of {n_test})", "paper, speech frame accuracy"], rows)
    tried = ", ".join(f"{a:g}: {r.val_errors}" for a, r in candidates.items())
    drop = hard.info["val_acc"][hard.info["best_epoch"] - 1] - hard.info["val_acc"][-1]
    notes = [f"the {p.small_fraction:.0%} students have the large net's architecture ({describe(arch)}) without its "
             "dropout and jitter, so the only difference between them is the targets",
             f"every run keeps its best held-out epoch (early stopping); the hard-label run's held-out accuracy "
             f"fell by {100 * drop:.1f} points from its best epoch to its last",
             f"alpha chosen on held-out errors: {tried} -> {alpha:g}"]
    data = {"baseline": summary(baseline), "hard": summary(hard), "soft": summary(soft), "alpha": alpha,
            "small_examples": len(small), "hard_val_acc": hard.info["val_acc"], "soft_val_acc": soft.info["val_acc"]}
    return Result("small-data", "4. Soft targets as a regulariser: 3% of the data (paper section 6)",
                  [table], notes, data)


# ----------------------------------------------------------------------------------------------
# A synthetic transfer set


def munge(images: np.ndarray, copies: int, p: float, s: float, jitter_px: int = 0, seed: int = 0) -> np.ndarray:
    """Perturbed copies of ``images`` (uint8 [N, H, W(, C)]) after Bucilua et al.'s MUNGE.

    Each copy of an example resamples a share ``p`` of its pixels from a normal distribution centred
    on its nearest neighbour's value, with standard deviation |difference| / ``s``: new examples stay
    near the data (between an example and its neighbour) but explore where the labelled set is
    sparse, which is where the teacher has something to say that the hard labels do not. (MUNGE also
    perturbs the neighbour symmetrically; one copy per example per pass is the same distribution.)
    Then each copy is shifted by up to ``jitter_px`` whole pixels. Returns uint8 [copies * N, ...].
    """
    n = len(images)
    flat = images.reshape(n, -1).astype(np.float32)
    neighbours = NearestNeighbors(n_neighbors=min(2, n)).fit(flat).kneighbors(flat, return_distance=False)
    first_is_self = neighbours[:, 0] == np.arange(n)
    other = np.where(first_is_self, neighbours[:, -1], neighbours[:, 0])
    near = flat[other]
    spread = np.abs(flat - near) / s
    rng = np.random.default_rng(seed)
    out = np.empty((copies, n, flat.shape[1]), np.float32)
    for c in range(copies):
        swap = rng.random(flat.shape) < p
        out[c] = np.where(swap, rng.normal(near, spread), flat)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(copies * n, *images.shape[1:])
    return shift(out, jitter_px, rng) if jitter_px else out


def shift(images: np.ndarray, max_px: int, rng: np.random.Generator) -> np.ndarray:
    """Move each image by a random whole-pixel offset in [-max_px, max_px]^2, filling with 0 (background)."""
    n, h, w = images.shape[:3]
    padded = np.pad(images, [(0, 0), (max_px, max_px), (max_px, max_px)] + [(0, 0)] * (images.ndim - 3))
    dy, dx = rng.integers(-max_px, max_px + 1, size=(2, n))
    out = np.empty_like(images)
    for oy in range(-max_px, max_px + 1):
        for ox in range(-max_px, max_px + 1):
            sel = np.flatnonzero((dy == oy) & (dx == ox))
            out[sel] = padded[sel, max_px - oy:max_px - oy + h, max_px - ox:max_px - ox + w]
    return out


def synthetic_transfer(lab: Lab) -> Result:
    """Distil a small net on the small set alone vs the small set enlarged with MUNGE copies labelled
    by the teacher, for a teacher trained on the small set (Bucilua et al.'s setting: nothing else
    is labelled) and for the large net trained on all the data."""
    p, s = lab.paper, lab.cfg.student
    small = small_subset(lab)
    t, alpha = s.loss.temperature, chosen_small_alpha(lab)
    teachers = {
        "small-set teacher": lab.train(f"large net on {p.small_fraction:.0%} of the data", lab.cfg.generalist.model,
                                       small, p.small_train, regularise=True, repeats=p.small_repeats),
        "full-data teacher": lab.large_net(),
    }
    synthetic = munge(small.images, p.synthetic_copies, p.munge_p, p.munge_s, p.synthetic_jitter_px, lab.cfg.seed)
    # the enlarged set is copies+1 times bigger: fewer passes per epoch keep the step count comparable
    big_repeats = max(1, round(p.small_repeats / (p.synthetic_copies + 1)))
    hard = lab.train(f"{describe(s.model)} hard labels on the small set", s.model, small, p.small_train,
                     repeats=p.small_repeats)
    columns: dict[str, dict[str, Run]] = {}
    for who, teacher in teachers.items():
        # synthetic examples have no labels: their hard label (used when alpha < 1) is the teacher's argmax
        labels = lab.soft_targets(teacher, synthetic).argmax(1).numpy()
        enlarged = Split(np.concatenate([small.images, synthetic]), np.concatenate([small.labels, labels]))
        columns[who] = {
            "teacher": teacher,
            "alone": lab.train(f"{describe(s.model)} distilled ({who}) on the small set", s.model, small,
                               p.small_train, teacher=teacher, temperature=t, alpha=alpha, repeats=p.small_repeats),
            "munge": lab.train(f"{describe(s.model)} distilled ({who}) on small set + MUNGE", s.model, enlarged,
                               p.small_train, teacher=teacher, temperature=t, alpha=alpha, repeats=big_repeats),
        }
    n = len(small)
    what = {"teacher": "the teacher itself (large net, regularised)",
            "alone": f"student, soft targets on the small set alone ({n})",
            "munge": f"student, soft targets on the small set + {len(synthetic)} MUNGE copies"}
    rows = [[label, *[columns[who][k].test_errors for who in teachers]] for k, label in what.items()]
    rows.insert(1, [f"student, hard labels on the small set ({n})", *[hard.test_errors] * len(teachers)])
    n_test = len(lab.data.test)
    table = md_table(["model", *[f"{who}: test errors (of {n_test})" for who in teachers]], rows)
    notes = [f"small labelled set: {n} examples ({p.small_fraction:.0%}, stratified); student {describe(s.model)}; "
             f"T={t:g}, alpha={alpha:g} (the small-data experiment's held-out choice)",
             f"MUNGE: {p.synthetic_copies} copies, p={p.munge_p:g}, s={p.munge_s:g}, then shifts of up to "
             f"{p.synthetic_jitter_px} px; synthetic examples are labelled only by the teacher",
             "paper (Bucilua et al. 2006): compressing an ensemble through MUNGE data kept most of its "
             "advantage, where training the small model on the labelled set alone did not"]
    data = {"small_examples": n, "synthetic_examples": len(synthetic), "alpha": alpha, "temperature": t,
            "hard": summary(hard),
            "teachers": {who: {k: summary(r) for k, r in col.items()} for who, col in columns.items()}}
    return Result("synthetic-transfer", "5. Model compression with a synthetic transfer set (Bucilua et al. 2006)",
                  [table], notes, data)
