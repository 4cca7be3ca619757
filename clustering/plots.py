"""Pictures of the clustering: the matrix reordered by group, and a few groups as images or names.

Both figures are built with matplotlib's object API (no pyplot global state) and written atomically.
Hanzi class names need a CJK font: the first installed Noto/WenQuanYi CJK face is added as a
fallback after DejaVu Sans, so Latin names keep their usual look.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from matplotlib import font_manager, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clustering.matrices import PredictionMatrix
from specdistill.artifacts import atomic_path

_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "WenQuanYi Zen Hei",
              "WenQuanYi Micro Hei", "AR PL UMing CN")


def font_families() -> list[str]:
    """DejaVu Sans, then a CJK-capable fallback when one is installed."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in _CJK_FONTS if name in installed][:1]


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "glyph missing from font" for exotic names
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def sample_by_group(cores: list[np.ndarray], num_classes: int, max_classes: int,
                    seed: int) -> tuple[np.ndarray, list[int]]:
    """Classes to show, whole groups at a time (random groups when they do not all fit), ordered
    by group; returns the class ids and the group boundaries (cumulative sizes)."""
    order = np.arange(len(cores))
    if sum(map(len, cores)) > max_classes:
        order = np.random.default_rng(seed).permutation(len(cores))
    shown, bounds = [], []
    for i in order:
        room = max_classes - sum(map(len, shown))
        if room <= 0:
            break
        shown.append(cores[i][:room])
        bounds.append(sum(map(len, shown)))
    covered = np.concatenate(shown)
    if len(covered) < max_classes:   # classes in no group (dropped as too small) go last
        rest = np.setdiff1d(np.arange(num_classes), np.concatenate(cores))[: max_classes - len(covered)]
        covered = np.concatenate([covered, rest])
    return covered.astype(np.int64), bounds


def matrix_figure(matrix: PredictionMatrix, cores: list[np.ndarray], class_names: list[str],
                  max_classes: int = 300, seed: int = 0) -> Figure:
    """Heatmap of the clustered matrix, rows and columns ordered by group, group borders drawn.

    The colour scale is clipped at the 99th percentile of the off-diagonal entries: otherwise the
    diagonal (a class's own variance) would make every co-prediction look white.
    """
    index, bounds = sample_by_group(cores, matrix.num_classes, max_classes, seed)
    block = matrix.columns(index)[index]
    off = np.abs(block[~np.eye(len(index), dtype=bool)])
    vmax = float(np.percentile(off, 99)) if off.size and off.max() > 0 else 1.0
    with rc_context({"font.family": font_families()}):
        fig = Figure(figsize=(8.5, 7.5))
        ax = fig.add_subplot()
        image = ax.imshow(block, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        width = 0.6 if len(bounds) <= 20 else 0.2      # many small groups: hairlines
        for edge in bounds[:-1]:
            ax.axhline(edge - 0.5, color="0.35", linewidth=width)
            ax.axvline(edge - 0.5, color="0.35", linewidth=width)
        if len(index) <= 60:
            names = [class_names[i] for i in index]
            ax.set_xticks(range(len(index)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(index)), names, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        sample = "" if len(index) == matrix.num_classes else f"{len(index)} of {matrix.num_classes} classes, "
        ax.set_title(f"{matrix.kind} of held-out predictions, ordered by group\n"
                     f"({sample}{len(bounds)} groups shown; colour clipped at the 99th percentile)",
                     fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def group_tightness(points: np.ndarray, group: np.ndarray) -> float:
    """Mean squared distance to the group's centroid relative to its points' squared length: small
    for a group whose classes are confused with one another in the same way."""
    members = points[group].astype(np.float64)
    spread = ((members - members.mean(0)) ** 2).sum(1).mean()
    return float(spread / max((members**2).sum(1).mean(), 1e-30))


def groups_figure(groups: list[np.ndarray], cores: list[np.ndarray], points: np.ndarray,
                  class_names: list[str], examples: np.ndarray | None = None, max_groups: int = 6,
                  max_per_group: int = 12) -> Figure:
    """The tightest few groups, one row each: their class images (when ``examples`` [K, H, W(, C)]
    is given) or names. Classes added by growing a group (overlap) are marked with '+'."""
    candidates = [i for i, core in enumerate(cores) if len(core) >= 2] or list(range(len(cores)))
    chosen = sorted(candidates, key=lambda i: group_tightness(points, cores[i]))[:max_groups]
    chosen.sort()
    columns = min(max_per_group, max(len(groups[i]) for i in chosen))
    with rc_context({"font.family": font_families()}):
        fig = Figure(figsize=(1.1 * columns + 1.6, 1.35 * len(chosen) + 0.6))
        grid = fig.add_gridspec(len(chosen), columns, hspace=0.55, wspace=0.15)
        for row, g in enumerate(chosen):
            members = groups[g][:columns]
            core = set(cores[g].tolist())
            for col in range(columns):
                ax = fig.add_subplot(grid[row, col])
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"group {g}\n({len(groups[g])} cls)", fontsize=8, rotation=0,
                                  ha="right", va="center")
                if col >= len(members):
                    ax.axis("off")
                    continue
                cls = int(members[col])
                label = class_names[cls] + ("" if cls in core else " +")
                if examples is not None:
                    image = examples[cls]
                    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
                    ax.set_title(_short(label), fontsize=8)
                else:
                    ax.text(0.5, 0.5, _short(label, 14), ha="center", va="center", fontsize=11,
                            transform=ax.transAxes)
        fig.suptitle("Tightest groups (k-means members, then '+' classes added by --size)", fontsize=10)
    return fig


def _short(text: str, limit: int = 10) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
