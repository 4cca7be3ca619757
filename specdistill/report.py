"""The run's ``report.md``: every stage's result in one page, with pictures, and a short summary.

Reads only files in the run directory (each stage writes its own ``report.md`` / ``eval.json``), so
it can be regenerated at any time: ``python -m specdistill.report --config CONFIG``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from specdistill.artifacts import atomic_path, read_json, write_text
from specdistill.cli import config_from_args, stage_parser
from specdistill.config import STAGES, Config
from specdistill.errors import exit_on_error


def _load(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def _plot_training_curve(run: Path) -> str | None:
    metrics = run / "generalist" / "metrics.jsonl"
    if not metrics.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [r["train_acc"] for r in rows], label="train (augmented)")
    if "val_acc" in rows[0]:
        ax.plot(epochs, [r["val_acc"] for r in rows], label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("generalist training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run / "generalist-training.png"   # the report's own: stage folders stay as the stages left them
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out.name


def _sample_grid(cfg: Config, run: Path) -> str | None:
    out = run / "data-samples.png"
    if not out.exists():
        from specdistill.data import load_data
        from specdistill.data.preview import save_sample_grid

        save_sample_grid(load_data(cfg.data, cfg.seed), out)
    return out.name


def _embed(run: Path, stage: str, heading_level: int = 3) -> str:
    """A stage's own report.md, with its headings demoted and image links made run-relative."""
    path = run / stage / "report.md"
    if not path.exists():
        return f"*({stage}/report.md not written yet)*\n"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(#+)", lambda m: "#" * min(6, len(m.group(1)) + heading_level - 1), text, flags=re.M)
    return re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", rf"]({stage}/\1)", text)


def headline(cfg: Config) -> dict[str, Any]:
    """The few numbers the summary table shows, from whatever stages have finished."""
    run = cfg.run_path
    out: dict[str, Any] = {}
    gen = _load(run / "generalist" / "meta.json")
    if gen:
        out["classes"] = gen["num_classes"]
        out["generalist test acc"] = gen["metrics"]["test_acc"]
    clusters = _load(run / "clustering" / "clusters.json")
    if clusters:
        out["specialists"] = len(clusters["groups"])
    ev = _load(run / "combine" / "eval.json")
    if ev:
        acc = ev.get("table3", {}).get("ensemble_acc")
        if acc is not None:
            out["ensemble test acc"] = acc
    st = _load(run / "student" / "eval.json")
    if st:
        out["student test acc"] = st["test_acc"]
        student = (st.get("students") or {}).get("student", {})
        if gen and gen.get("macs") and student.get("macs"):
            out["student compute"] = f"{student['macs'] / gen['macs']:.2f}x the generalist's multiply-adds"
        hard = (st.get("students") or {}).get("hard")
        if hard:
            out["hard-label student test acc"] = hard["test_acc"]
        kept = (st.get("gain_kept") or {}).get("student")
        if kept is not None:   # a share below zero only says the student is under the generalist
            out["student keeps of the ensemble's gain"] = f"{kept:.0%}" if kept >= 0 else "none (below the generalist)"
    return out


def write_report(cfg: Config, timings: dict[str, dict] | None = None) -> Path:
    run = cfg.run_path
    timings = timings if timings is not None else (_load(run / "timings.json") or {})
    parts = [f"# specdistill run `{cfg.name}`\n",
             f"Config: `{run / 'config.yaml'}` · data source `{cfg.data.source}`\n"]
    summary = headline(cfg)
    if summary:
        parts.append("| | |\n|---|---|\n" + "".join(
            f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in summary.items()))
    parts.append("## Data\n")
    grid = _sample_grid(cfg, run)
    gen = _load(run / "generalist" / "meta.json")
    if gen:
        d = gen.get("data", {})
        parts.append(f"{gen['num_classes']} classes; {d.get('train')} train, {d.get('val')} held-out, "
                     f"{d.get('test')} test images.\n")
    if grid:
        parts.append(f"![samples per split]({grid})\n")
    parts.append("## Generalist\n")
    if gen:
        m = gen["metrics"]
        parts.append(f"`{gen['model']['name']}` ({gen.get('parameters', 0):,} parameters, "
                     f"{gen.get('macs', 0) / 1e6:.1f} M multiply-adds): held-out accuracy {m['val_acc']:.4f}, "
                     f"**test accuracy {m['test_acc']:.4f}**, best epoch {m['best_epoch']} of "
                     f"{m['epochs_run']}.\n")
        curve = _plot_training_curve(run)
        if curve:
            parts.append(f"![training curve]({curve})\n")
    parts.append("## Confusable groups (clustering)\n")
    clusters = _load(run / "clustering" / "clusters.json")
    if clusters:
        sizes = [len(g["classes"]) for g in clusters["groups"]]
        parts.append(f"{len(sizes)} groups, sizes {min(sizes)}-{max(sizes)}; coverage (classes by number of "
                     f"groups covering them): `{json.dumps(clusters.get('coverage', {}).get('histogram', {}))}`.\n")
        for g in clusters["groups"][:8]:
            parts.append(f"- group {g['id']}: {' '.join(map(str, g['names'][:20]))}"
                         + (" ..." if len(g["names"]) > 20 else "") + "\n")
        for png in sorted((run / "clustering").glob("*.png")):
            parts.append(f"\n![{png.stem}](clustering/{png.name})\n")
    parts.append("\n## Specialists + generalist (paper tables 3 and 4)\n")
    parts.append(_embed(run, "combine"))
    parts.append("\n## Distilled student\n")
    parts.append(_embed(run, "student"))
    if timings:
        parts.append("\n## Time and memory per stage\n\n| stage | seconds | peak memory (MiB) |\n|---|---|---|\n")
        for stage in STAGES:
            if stage in timings:
                t = timings[stage]
                parts.append(f"| {stage} | {t['seconds']:.1f} | {t['peak_rss_mb']} |\n")
    path = run / "report.md"
    write_text(path, "\n".join(parts))
    return path


def print_summary(cfg: Config, timings: dict[str, dict] | None = None) -> None:
    run = cfg.run_path
    timings = timings if timings is not None else (_load(run / "timings.json") or {})
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in headline(cfg).items()]
    rows += [(f"{s} time", f"{timings[s]['seconds']:.0f} s, {timings[s]['peak_rss_mb']} MiB")
             for s in STAGES if s in timings]
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\nrun {cfg.name}: {run / 'report.md'}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = stage_parser("Write <run>/report.md from the run directory.").parse_args(argv)
    cfg = config_from_args(args)
    print(write_report(cfg))


if __name__ == "__main__":
    main()
