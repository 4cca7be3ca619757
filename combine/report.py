"""combine/report.md and combine/table4.png from the evaluation result (eval.json's content)."""

from __future__ import annotations

from pathlib import Path

from specdistill.artifacts import atomic_path, write_text
from specdistill.formatting import md_table, percent
from specdistill.records import CombineResult
from specdistill.rundir import RunDir

SYSTEM_TEXT = {
    "generalist": "generalist alone",
    "average": "average of available distributions",
    "product": "product of experts",
}


def _pct(x: float | None) -> str:
    return percent(x, digits=2, missing="n/a")


def _relative(change: float | None) -> str:
    """A relative change with its sign, ``+4.4%``."""
    return "n/a" if change is None else f"{100 * change:+.1f}%"


def _system_name(name: str, main: str) -> str:
    if name.startswith("kl_top"):
        text = f"KL combiner, generalist's top-{name[6:]} activates"
        return text + " (the ensemble)" if name == main else text
    return SYSTEM_TEXT.get(name, name)


def render_markdown(result: CombineResult, split: str = "test") -> str:
    main = result.ensemble
    t3 = result.table3(split)
    evaluation = result.split(split)
    active = evaluation.active_specialists
    lines = [
        "# Combine: generalist + specialists (paper section 5.4)",
        "",
        f"{evaluation.num_examples} {split} examples, {result.num_classes} classes, "
        f"{result.num_specialists} specialists; active = specialists whose group contains one of "
        f"the generalist's top-{result.top_n} classes "
        f"(mean {active['mean']:.2f} per example, none for "
        f"{_pct(active['none'])}); solver `{result.solver}` "
        f"(mean {active['solver_iterations_mean']:.1f} iterations, "
        f"max {active['solver_iterations_max']}).",
        "",
        "## Table 3: accuracy",
        "",
        md_table(["System", "Conditional test accuracy", "Test accuracy"], [
            ["Generalist", _pct(t3["generalist_conditional_acc"]), _pct(t3["generalist_acc"])],
            [f"+ {result.num_specialists} specialist models", _pct(t3["ensemble_conditional_acc"]),
             _pct(t3["ensemble_acc"])],
        ], align="lrr"),
        "",
        f"Conditional accuracy: the {t3['conditional_examples']} examples whose true class belongs to some "
        "specialist's group, with predictions restricted to the specialists' classes.",
        "",
        "## Table 4: by the number of specialists covering the correct class",
        "",
        md_table(["# specialists covering", "# test examples", "delta in top-1 correct", "relative accuracy change"],
                 [[row["covering"], row["examples"], f"{row['delta_correct']:+d}", _relative(row["relative_change"])]
                  for row in evaluation.table4], align="rrrr"),
        "",
        "Relative accuracy change: the change in top-1 correct over the generalist's correct count in the row.",
        "",
        "![Table 4](table4.png)",
        "",
        "## Every system on the same predictions",
        "",
        md_table(["System", "Accuracy", "Top-5", "NLL", "ECE", "Conditional accuracy"],
                 [[_system_name(name, main), _pct(m["accuracy"]), _pct(m["top5"]), f"{m['nll']:.4f}",
                   f"{m['ece']:.4f}", _pct(m["conditional_accuracy"])] for name, m in evaluation.systems.items()],
                 align="lrrrrr"),
        "",
        "The average and the product map each specialist to all K classes by spreading its dustbin "
        "probability over the classes outside its group in proportion to the generalist's "
        "probabilities there; they use the same active specialists as the ensemble.",
        "",
        "## Timings",
        "",
    ]
    timings = evaluation.timings
    forward = timings.get("forward")
    if forward:
        lines.append(f"- forward, generalist: {forward['generalist_s']:.2f} s for {forward['images']} images")
        lines.append(f"- forward, {forward['num_specialists']} specialists, each on the images where a compared "
                     f"top-n activates it: {forward['specialists_s']:.2f} s for {forward['specialist_images']} "
                     "images in all")
    for key, value in timings.items():
        if key.startswith("kl_top"):
            lines.append(f"- combiner, {key[:-2]}: {value:.3f} s")
    return "\n".join(lines) + "\n"


def plot_table4(result: CombineResult, path: Path, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.split(split).table4
    labels = [r["covering"] for r in rows]
    rel = [100 * (r["relative_change"] or 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, rel, color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.annotate(f"n={r['examples']}\n{r['delta_correct']:+d}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom" if bar.get_height() >= 0 else "top",
                    fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.2)   # room for the labels
    ax.set_xlabel("number of specialists covering the correct class")
    ax.set_ylabel("relative accuracy change (%)")
    ax.set_title("Table 4: gain of the ensemble over the generalist")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(run: RunDir, result: CombineResult) -> None:
    plot_table4(result, run.table4_figure)
    write_text(run.combine_report, render_markdown(result))
