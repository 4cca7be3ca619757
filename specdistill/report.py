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
from specdistill.formatting import md_table
from specdistill.records import Clusters, CombineResult
from specdistill.rundir import RunDir


def _load(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def _link(run: RunDir, path: Path) -> str:
    """A file of the run as report.md (at the run root) links it."""
    return path.relative_to(run.root).as_posix()


def _plot_training_curve(run: RunDir) -> str | None:
    metrics = run.generalist_metrics
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
    out = run.training_curve   # the report's own: stage folders stay as the stages left them
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return _link(run, out)


def _sample_grid(cfg: Config, run: RunDir) -> str | None:
    out = run.data_samples
    if not out.exists():
        from specdistill.data import load_data
        from specdistill.data.preview import save_sample_grid

        save_sample_grid(load_data(cfg.data, cfg.seed), out)
    return _link(run, out)


def _embed(run: RunDir, path: Path, heading_level: int = 3) -> str:
    """A stage's own report.md, with its headings demoted and image links made run-relative."""
    where = _link(run, path.parent)
    if not path.exists():
        return f"*({_link(run, path)} not written yet)*\n"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(#+)", lambda m: "#" * min(6, len(m.group(1)) + heading_level - 1), text, flags=re.M)
    return re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", rf"]({where}/\1)", text)


def _clusters(run: RunDir) -> Clusters | None:
    return Clusters.read(run.clusters) if run.clusters.exists() else None


def headline(cfg: Config) -> dict[str, Any]:
    """The few numbers the summary table shows, from whatever stages have finished."""
    run = RunDir.of(cfg)
    out: dict[str, Any] = {}
    gen = _load(run.generalist_meta)
    if gen:
        out["classes"] = gen["num_classes"]
        out["generalist held-out acc"] = gen["metrics"]["val_acc"]
        out["generalist test acc"] = gen["metrics"]["test_acc"]
    clusters = _clusters(run)
    if clusters:
        out["specialists"] = len(clusters.groups)
    if run.combine_eval.exists():
        combined = CombineResult.read(run.combine_eval)
        if "val" in combined.splits:
            out["ensemble held-out acc"] = combined.ensemble_acc("val")
        out["ensemble test acc"] = combined.ensemble_acc("test")
        if combined.rivals:   # combine.rivals: what the specialists' compute buys spent on generalists
            out[f"generalist {combined.rivals['longer']['epochs']} epochs test acc"] = combined.rivals["longer"]["test"]
            out["2 generalists test acc"] = combined.rivals["seeds"]["test"]
    st = _load(run.student_eval)
    if st:
        student = (st.get("students") or {}).get("student", {})
        if "val_acc" in student:
            out["student held-out acc"] = student["val_acc"]
        out["student test acc"] = st["test_acc"]
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
    run = RunDir.of(cfg)
    timings = timings if timings is not None else (_load(run.timings) or {})
    parts = [f"# specdistill run `{cfg.name}`\n",
             f"Config: `{run.config}` · data source `{cfg.data.source}`\n"]
    summary = headline(cfg)
    if summary:
        parts.append(md_table(["", ""], [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in summary.items()])
                     + "\n")
    parts.append("## Data\n")
    grid = _sample_grid(cfg, run)
    gen = _load(run.generalist_meta)
    if gen:
        d = gen.get("data", {})
        parts.append(f"{gen['num_classes']} classes; {d.get('train')} train, {d.get('val')} held-out, "
                     f"{d.get('test')} test images.\n")
    if grid:
        parts.append(f"![samples per split]({grid})\n")
    parts.append("## Generalist\n")
    if gen:
        m = gen["metrics"]
        how = (f"imported from `{gen['imported']['weights']}`" if "imported" in gen
               else f"best epoch {m['best_epoch']} of {m['epochs_run']}")
        parts.append(f"`{gen['model']['name']}` ({gen.get('parameters', 0):,} parameters, "
                     f"{gen.get('macs', 0) / 1e6:.1f} M multiply-adds): held-out accuracy {m['val_acc']:.4f}, "
                     f"**test accuracy {m['test_acc']:.4f}**, {how}.\n")
        curve = _plot_training_curve(run)
        if curve:
            parts.append(f"![training curve]({curve})\n")
    parts.append("## Confusable groups (clustering)\n")
    clusters = _clusters(run)
    if clusters:
        sizes = [len(g.classes) for g in clusters.groups]
        histogram = clusters.details.get("coverage", {}).get("histogram", {})
        parts.append(f"{len(sizes)} groups, sizes {min(sizes)}-{max(sizes)}; coverage (classes by number of "
                     f"groups covering them): `{json.dumps(histogram)}`.\n")
        for g in clusters.groups[:8]:
            parts.append(f"- group {g.id}: {' '.join(map(str, g.names[:20]))}"
                         + (" ..." if len(g.names) > 20 else "") + "\n")
        for png in sorted(run.clustering.glob("*.png")):
            parts.append(f"\n![{png.stem}]({_link(run, png)})\n")
    parts.append("\n## Specialists + generalist (paper tables 3 and 4)\n")
    parts.append(_embed(run, run.combine_report))
    parts.append("\n## Distilled student\n")
    parts.append(_embed(run, run.student_report))
    if timings:
        parts.append("\n## Time and memory per stage\n")
        rows = [[stage, f"{timings[stage]['seconds']:.1f}", timings[stage]["peak_rss_mb"]]
                for stage in STAGES if stage in timings]
        parts.append(md_table(["stage", "seconds", "peak memory (MiB)"], rows) + "\n")
    write_text(run.report, "\n".join(parts))
    return run.report


def print_summary(cfg: Config, timings: dict[str, dict] | None = None) -> None:
    run = RunDir.of(cfg)
    timings = timings if timings is not None else (_load(run.timings) or {})
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in headline(cfg).items()]
    rows += [(f"{s} time", f"{timings[s]['seconds']:.0f} s, {timings[s]['peak_rss_mb']} MiB")
             for s in STAGES if s in timings]
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\nrun {cfg.name}: {run.report}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = stage_parser("Write <run>/report.md from the run directory.").parse_args(argv)
    cfg = config_from_args(args)
    print(write_report(cfg))


if __name__ == "__main__":
    main()
