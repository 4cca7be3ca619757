"""combine/report.md and combine/table4.png from the evaluation result (eval.json's content)."""

from __future__ import annotations

from pathlib import Path

from specdistill.artifacts import atomic_path, write_text

SYSTEM_TEXT = {
    "generalist": "generalist alone",
    "average": "average of available distributions",
    "product": "product of experts",
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _system_name(name: str, main: str) -> str:
    if name.startswith("kl_top"):
        text = f"KL combiner, generalist's top-{name[6:]} activates"
        return text + " (the ensemble)" if name == main else text
    return SYSTEM_TEXT.get(name, name)


def render_markdown(result: dict) -> str:
    main = result["ensemble"]["system"]
    t3 = result["table3"]
    lines = [
        "# Combine: generalist + specialists (paper section 5.4)",
        "",
        f"{result['num_examples']} test examples, {result['num_classes']} classes, "
        f"{result['num_specialists']} specialists; active = specialists whose group contains one of "
        f"the generalist's top-{result['top_n']} classes "
        f"(mean {result['active_specialists']['mean']:.2f} per example, none for "
        f"{_pct(result['active_specialists']['none'])}); solver `{result['solver']}` "
        f"(mean {result['active_specialists']['solver_iterations_mean']:.1f} iterations, "
        f"max {result['active_specialists']['solver_iterations_max']}).",
        "",
        "## Table 3: accuracy",
        "",
        "| System | Conditional test accuracy | Test accuracy |",
        "|---|---:|---:|",
        f"| Generalist | {_pct(t3['generalist_conditional_acc'])} | {_pct(t3['generalist_acc'])} |",
        f"| + {result['num_specialists']} specialist models | {_pct(t3['ensemble_conditional_acc'])} | "
        f"{_pct(t3['ensemble_acc'])} |",
        "",
        f"Conditional accuracy: the {t3['conditional_examples']} examples whose true class belongs to some "
        "specialist's group, with predictions restricted to the specialists' classes.",
        "",
        "## Table 4: by the number of specialists covering the correct class",
        "",
        "| # specialists covering | # test examples | delta in top-1 correct | relative accuracy change |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["table4"]:
        rel = "n/a" if row["relative_change"] is None else f"{100 * row['relative_change']:+.1f}%"
        lines.append(f"| {row['covering']} | {row['examples']} | {row['delta_correct']:+d} | {rel} |")
    lines += [
        "",
        "Relative accuracy change: the change in top-1 correct over the generalist's correct count in the row.",
        "",
        "![Table 4](table4.png)",
        "",
        "## Every system on the same predictions",
        "",
        "| System | Accuracy | Top-5 | NLL | ECE | Conditional accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["systems"].items():
        lines.append(f"| {_system_name(name, main)} | {_pct(m['accuracy'])} | {_pct(m['top5'])} | "
                     f"{m['nll']:.4f} | {m['ece']:.4f} | {_pct(m['conditional_accuracy'])} |")
    lines += [
        "",
        "The average and the product map each specialist to all K classes by spreading its dustbin "
        "probability over the classes outside its group in proportion to the generalist's "
        "probabilities there; they use the same active specialists as the ensemble.",
        "",
        "## Timings",
        "",
    ]
    timings = result["timings"]
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


def plot_table4(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table4"]
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


def write_report(out_dir: str | Path, result: dict) -> None:
    out_dir = Path(out_dir)
    plot_table4(result, out_dir / "table4.png")
    write_text(out_dir / "report.md", render_markdown(result))
