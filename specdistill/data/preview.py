"""A picture of a data set: sample images of the same classes in each split, with class names.

The quickest check that a source is right (glyphs centred, legible, not empty; train and test faces
different) is to look at it: ``python -m specdistill.data.preview --config configs/X.yaml out.png``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np

from specdistill.artifacts import atomic_path
from specdistill.data import Dataset
from specdistill.errors import exit_on_error

# Fonts with CJK coverage, most preferred first (Debian packages fonts-noto-cjk, fonts-wqy-zenhei, ...)
_CJK_FONT_NAMES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "Droid Sans Fallback",
                   "AR PL UMing CN", "AR PL UKai CN", "LXGW WenKai", "Noto Serif CJK SC")


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """A font file matplotlib can use for CJK class names, or None when none is installed."""
    from matplotlib import font_manager

    by_name = {entry.name: entry.fname for entry in font_manager.fontManager.ttflist}
    for name in _CJK_FONT_NAMES:
        if name in by_name:
            return by_name[name]
    return None


def _needs_cjk(names: list[str]) -> bool:
    return any(any(ord(ch) >= 0x2E80 for ch in name) for name in names)


def save_sample_grid(dataset: Dataset, path: str | Path, classes: int = 16, per_class: int = 2,
                     seed: int = 0) -> Path:
    """Save a PNG: columns are ``classes`` classes (the same in every split), rows ``per_class`` samples
    of each split (train, then val, then test), the class name above each column."""
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(dataset.num_classes, min(classes, dataset.num_classes), replace=False))
    names = [dataset.class_names[c] for c in shown]
    font = None
    if _needs_cjk(names) and cjk_font_path():
        font = FontProperties(fname=cjk_font_path())
    rows = [(split, k) for split in ("train", "val", "test") for k in range(per_class)]
    fig = Figure(figsize=(0.75 * len(shown) + 0.9, 0.78 * len(rows) + 0.5), dpi=110)
    grid = fig.subplots(len(rows), len(shown), squeeze=False)
    grey = dataset.channels == 1
    for r, (split_name, k) in enumerate(rows):
        split = dataset.split(split_name)
        for c, cls in enumerate(shown):
            ax = grid[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            members = np.flatnonzero(split.labels == cls)
            if members.size > k:
                pick = members[rng.permutation(members.size)[k]]
                ax.imshow(split.images[pick], cmap="gray" if grey else None, vmin=0, vmax=255)
            if r == 0:
                ax.set_title(names[c], fontsize=11, fontproperties=font)
            if c == 0:
                ax.set_ylabel(split_name if k == 0 else "", fontsize=10)
    fig.suptitle(f"{dataset.name}: {dataset.num_classes} classes, train/val/test = "
                 f"{len(dataset.train)}/{len(dataset.val)}/{len(dataset.test)}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from specdistill.config import load_config
    from specdistill.data import load_data

    parser = argparse.ArgumentParser(description="Save a PNG of sample images of a data source.")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.source=glyphs-hanzi")
    parser.add_argument("--classes", type=int, default=16)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    dataset = load_data(cfg.data, cfg.seed)
    print(save_sample_grid(dataset, args.out, classes=args.classes))


if __name__ == "__main__":
    main()
