"""Systems of different runs on the same held-out and test examples: accuracy, and each against the first.

    python benchmarks/compare_runs.py configs/hanzi-1k.yaml \\
        "generalist=runs/h1k/generalist/preds-{split}.npy" \\
        "ensemble=runs/h1k/combine/preds-{split}.npy" \\
        "2 generalists=runs/h1k/generalist/preds-{split}.npy+runs/h1k-seed1/generalist/preds-{split}.npy" \\
        "student=runs/h1k/student/model.safetensors"

A system is ``NAME=PATH``: stored log-probabilities (``.npy`` dense, or a top-k ``.npz`` as the
generalist writes at large K; ``{split}`` in the path stands for ``val`` or ``test``), or a classifier
written by the project (``.safetensors``: a generalist, specialist-free student or baseline), which is
run on the config's data. ``PATH+PATH+...`` is the mean of their probabilities (an ensemble of
generalists, the rival a user weighs against specialists). Every pair is compared on the same
examples: how many only the first system gets right, how many only the other, and the two-sided sign
test on those (``student.report.paired``), the test that the student report uses within one run. The
runs must share the config's data (same source, classes and splits); a file with another number of
rows or classes stops with one line.

``--folds F`` adds each system's accuracy per fold: each class's examples in stored order cut into F
consecutive runs (``combine.choices.fold_ids``, the folds of ``combine.cross_fit``); the glyph
sources store a split font by font, so with F = 3 on hanzi each fold is one font.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from combine.choices import fold_ids  # noqa: E402
from specdistill.config import load_config  # noqa: E402
from specdistill.data import load_data  # noqa: E402
from specdistill.engine import predict_logits  # noqa: E402
from specdistill.errors import SpecdistillError, exit_on_error  # noqa: E402
from specdistill.models import load_classifier  # noqa: E402
from specdistill.predictions import StoredPredictions, block_rows  # noqa: E402
from student.report import paired  # noqa: E402

SPLITS = {"val": "held-out", "test": "test"}


def log_prob_blocks(name: str, path: str, split: str, images: np.ndarray, batch_size: int,
                    num_classes: int) -> Iterator[np.ndarray]:
    """One part's log-probabilities for ``split`` in blocks of :func:`block_rows` rows, after checking
    that it has one row per example and one column per class of the config."""
    file = Path(path.replace("{split}", split))
    if not file.is_file():
        raise SpecdistillError(f"{file} not found; give stored predictions (.npy or top-k .npz, '{{split}}' for "
                               "val/test) or a classifier (.safetensors)")
    if file.suffix == ".safetensors":
        model, _ = load_classifier(file)
        array = torch.log_softmax(predict_logits(model, images, batch_size, torch.device("cpu")).float(), 1).numpy()
        rows, classes = array.shape
        blocks = (array[start:start + block_rows(classes)] for start in range(0, rows, block_rows(classes)))
    else:
        stored = StoredPredictions.read(file)
        rows, classes = stored.num_examples, stored.num_classes
        blocks = (block for _, block in stored.blocks(block_rows(classes)))
    if rows != len(images) or classes != num_classes:
        raise SpecdistillError(f"{name}: {file} holds {rows} {split} predictions over {classes} classes but the "
                               f"config's {split} split has {len(images)} examples of {num_classes} classes; "
                               "compare runs made on the same data")
    return blocks


def predictions(name: str, path: str, split: str, images: np.ndarray, batch_size: int, num_classes: int) -> np.ndarray:
    """Top-1 class per example of ``split`` for the system ``path`` (parts joined by '+' averaged in
    probability), block by block so that large K stays in bounded memory."""
    parts = [log_prob_blocks(name, part, split, images, batch_size, num_classes) for part in path.split("+")]
    if len(parts) == 1:
        return np.concatenate([block.argmax(1) for block in parts[0]] or [np.zeros(0, np.int64)])
    return np.concatenate([sum(np.exp(block.astype(np.float64)) for block in blocks).argmax(1)
                           for blocks in zip(*parts, strict=True)] or [np.zeros(0, np.int64)])


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the config whose data every system was evaluated on")
    parser.add_argument("systems", nargs="+", help="NAME=PATH; the first is compared with each other")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--folds", type=int, default=0,
                        help="also the accuracy per fold (each class's examples cut in stored order; hanzi: 3 = fonts)")
    args = parser.parse_args(argv)
    systems = []
    for item in args.systems:
        name, sep, path = item.rpartition("=")   # a name may hold "=" (T=2), a path seldom does
        if not sep or not name or not path:
            raise SpecdistillError(f"system {item!r} is not NAME=PATH; e.g. 'ensemble=RUN/combine/preds-{{split}}.npy' "
                                   "or 'pair=A/generalist/preds-{split}.npy+B/generalist/preds-{split}.npy'")
        systems.append((name, path))
    cfg = load_config(args.config)
    dataset = load_data(cfg.data, cfg.seed)
    if args.folds == 1 or args.folds < 0:
        raise SpecdistillError(f"--folds {args.folds}: use 0 (off) or at least 2")
    right: dict[str, dict[str, np.ndarray]] = {name: {} for name, _ in systems}
    folds: dict[str, np.ndarray] = {}
    for split in SPLITS:
        data = dataset.split(split)
        labels = np.asarray(data.labels)
        folds[split] = fold_ids(labels, args.folds) if args.folds else np.zeros(len(labels), np.int64)
        for name, path in systems:
            top1 = predictions(name, path, split, data.images, args.batch_size, cfg.data.num_classes)
            right[name][split] = top1 == labels

    first = systems[0][0]
    print(f"{len(right[first]['val'])} held-out and {len(right[first]['test'])} test examples ({cfg.name})\n")
    print("| System | " + " | ".join(f"{label} accuracy" for label in SPLITS.values()) + " |")
    print("|---|" + "---:|" * len(SPLITS))
    for name, _ in systems:
        print(f"| {name} | " + " | ".join(f"{right[name][s].mean():.2%}" for s in SPLITS) + " |")
    print(f"\n| {first} against | " + " | ".join(f"{label}: only {first} / only other (p)" for label in SPLITS.values())
          + " |")
    print("|---|" + "---:|" * len(SPLITS))
    for name, _ in systems[1:]:
        cells = []
        for split in SPLITS:
            p = paired(right[first][split], right[name][split])
            cells.append(f"{p['only_student']} / {p['only_rival']} (p = {p['p_value']:.3g})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.folds:
        print_folds(systems, right, folds, args.folds)


def print_folds(systems: list[tuple[str, str]], right: dict[str, dict[str, np.ndarray]],
                folds: dict[str, np.ndarray], count: int) -> None:
    """Each system's accuracy on each fold of each split (examples per fold in the header)."""
    heads = [f"{label} fold {f + 1} ({int((folds[s] == f).sum())})"
             for s, label in SPLITS.items() for f in range(count)]
    print(f"\nPer fold (each class's examples cut into {count} runs in stored order)\n")
    print("| System | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    for name, _ in systems:
        cells = [f"{right[name][s][folds[s] == f].mean():.2%}" for s in SPLITS for f in range(count)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
