"""combine/report.md and combine/table4.png from the evaluation result (eval.json's content)."""

from __future__ import annotations

from pathlib import Path

from combine.rivals import rival_lines
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
    if name == f"{main}_ungated":
        return f"KL combiner, generalist's top-{main[6:]} activates, every specialist at equal weight (no gate)"
    if name.startswith("kl_top"):
        text = f"KL combiner, generalist's top-{name[6:]} activates"
        return text + " (the ensemble)" if name == main else text
    return SYSTEM_TEXT.get(name, name)


SPLIT_TEXT = {"val": "held-out", "test": "test"}


def render_markdown(result: CombineResult) -> str:
    """Tables 3 and 4 and every system, the held-out split beside the test split (every combine choice
    is made on the held-out split; the test split only gives the reported numbers)."""
    main = result.ensemble
    splits = [s for s in ("val", "test") if s in result.splits]
    names = [SPLIT_TEXT[s] for s in splits]
    test = result.split("test")
    active = test.active_specialists
    sizes = ", ".join(f"{result.split(s).num_examples} {SPLIT_TEXT[s]}" for s in splits)
    lines = [
        "# Combine: generalist + specialists (paper section 5.4)",
        "",
        f"{sizes} examples, {result.num_classes} classes, "
        f"{result.num_specialists} specialists; active = specialists whose group contains one of "
        f"the generalist's top-{result.top_n} classes "
        f"(test: mean {active['mean']:.2f} per example, none for "
        f"{_pct(active['none'])}); solver `{result.solver}` "
        f"(mean {active['solver_iterations_mean']:.1f} iterations, "
        f"max {active['solver_iterations_max']}).",
        *_gate_lines(result),
        "",
        "## Table 3: accuracy",
        "",
        md_table(["System", *(f"Conditional {n} accuracy" for n in names),
                  *(f"{n.capitalize()} accuracy" for n in names)],
                 [["Generalist", *(_pct(result.table3(s)["generalist_conditional_acc"]) for s in splits),
                   *(_pct(result.table3(s)["generalist_acc"]) for s in splits)],
                  [f"+ {result.num_specialists} specialist models",
                   *(_pct(result.table3(s)["ensemble_conditional_acc"]) for s in splits),
                   *(_pct(result.table3(s)["ensemble_acc"]) for s in splits)]],
                 align="l" + "r" * 2 * len(splits)),
        "",
        "Conditional accuracy: the examples whose true class belongs to some specialist's group ("
        + ", ".join(f"{result.split(s).conditional_examples} {SPLIT_TEXT[s]}" for s in splits)
        + "), with predictions restricted to the specialists' classes.",
        "",
        "## Table 4: by the number of specialists covering the correct class",
        "",
        md_table(["# specialists covering", *(f"# {n} examples" for n in names),
                  *(f"{n} delta in top-1 correct" for n in names), *(f"{n} relative accuracy change" for n in names)],
                 _table4_rows(result, splits), align="r" * (1 + 3 * len(splits))),
        "",
        "Relative accuracy change: the change in top-1 correct over the generalist's correct count in the row.",
        "",
        "![Table 4](table4.png)",
        "",
        *_causes_section(result, splits),
        *_cross_fit_lines(result.cross_fit),
        *rival_lines(result.rivals, {s: result.generalist_acc(s) for s in splits},
                     {s: result.ensemble_acc(s) for s in splits}, SPLIT_TEXT),
        "## Every system on the same predictions",
        "",
        md_table(["System", *(f"{n.capitalize()} accuracy" for n in names), "Test top-5", "Test NLL", "Test ECE",
                  "Test conditional accuracy"],
                 [[_system_name(name, main), *(_pct(result.accuracy(name, s)) for s in splits), _pct(m["top5"]),
                   f"{m['nll']:.4f}", f"{m['ece']:.4f}", _pct(m["conditional_accuracy"])]
                  for name, m in test.systems.items()],
                 align="l" + "r" * (len(splits) + 4)),
        *(["", "The average and the product map each specialist to all K classes by spreading its dustbin "
            "probability over the classes outside its group in proportion to the generalist's "
            "probabilities there; they use the same active specialists as the ensemble."]
          if "average" in test.systems else
          ["", "Only the configured combiner was scored (`combine.alternatives: false`)."]),
        "",
        "## Timings",
        "",
    ]
    for split in splits:
        timings = result.split(split).timings
        forward = timings.get("forward")
        if forward:
            lines.append(f"- {SPLIT_TEXT[split]}, forward, generalist: {forward['generalist_s']:.2f} s for "
                         f"{forward['images']} images")
            lines.append(f"- {SPLIT_TEXT[split]}, forward, {forward['num_specialists']} specialists, each on the "
                         f"images where a compared top-n activates it: {forward['specialists_s']:.2f} s for "
                         f"{forward['specialist_images']} images in all")
            if forward.get("generalist_passes", 1) > 1:
                lines.append(f"- {SPLIT_TEXT[split]}: the generalist's [N, K] outputs are over "
                             f"combine.memory_limit_mb, so it ran {forward['generalist_passes']} times, "
                             "a chunk of rows at a time")
            model_s = forward["generalist_s"] + forward["specialists_s"]
            kl_s = timings.get(f"kl_top{result.top_n}_s")
            if kl_s is not None and model_s > 0:
                lines.append(f"- {SPLIT_TEXT[split]}, the combiner (kl_top{result.top_n}) against the models' forward: "
                             f"{kl_s:.2f} s / {model_s:.2f} s = {100 * kl_s / model_s:.1f}%")
        for key, value in timings.items():
            if key.startswith("kl_top"):
                lines.append(f"- {SPLIT_TEXT[split]}, combiner, {key[:-2]}: {value:.3f} s")
    return "\n".join(lines) + "\n"


def _gate_lines(result: CombineResult) -> list[str]:
    if not result.gate:
        return []
    g, record = result.gate, result.gate.get("held_out") or {}
    lines = [""]
    if g["kind"] != "none":
        kept = sum(g["keep"])
        where = f", only where the generalist's top probability is below {g['threshold']:.3f}" if g["threshold"] < 1 \
            else ""
        lines.append(f"Gate `{g['kind']}` (combine.gate, fitted on the held-out split): {kept} of {len(g['keep'])} "
                     f"specialists consulted{where}. Held-out accuracy: generalist "
                     f"{_pct(record.get('generalist_acc'))}, ungated ensemble {_pct(record.get('ungated_acc'))}, "
                     f"gated {_pct(record.get('gated_acc'))}.")
    if g.get("weights") is not None:
        weights = [w for w, k in zip(g["weights"], g["keep"]) if k]
        counts = ", ".join(f"{weights.count(w)} at {w:g}" for w in sorted(set(weights)))
        lines.append(f"Weights in the KL objective (combine.weighting: fitted, by held-out log-loss; the generalist's "
                     f"is 1): {counts}. Held-out accuracy with equal weights {_pct(record.get('equal_weights_acc'))}, "
                     f"fitted {_pct(record.get('weighted_acc'))}.")
    return lines


def _cross_fit_lines(record: dict | None) -> list[str]:
    """The held-out choices checked on held-out folds they were not fitted on (combine.choices.cross_fit)."""
    if not record:
        return []
    folds, total = record["per_fold"], record["total"]
    gated = "ungated_on_others" in total

    def cells(row: dict) -> list[str]:
        def acc(key: str) -> str:
            return _pct(row[key] / row["examples"]) if row["examples"] else "n/a"

        systems = ["fitted_on_all", "fitted_on_others", *(["ungated_on_others"] if gated else [])]
        return [row["examples"], acc("generalist"),
                *(f"{acc(key)} ({row[key] - row['generalist']:+d})" for key in systems)]

    def gate(row: dict) -> list[str]:
        below = f", below {row['threshold']:.3f}" if row["threshold"] < 1 else ""
        return [f"{row['kept']} kept{below}"] if gated else []

    head = ["Fold left out", "Examples", "Generalist", "Ensemble, choices fitted on all held-out data",
            "Ensemble, choices fitted on the other folds",
            *(["Ungated, fitted on the other folds", "Gate of the other folds"] if gated else [])]
    rows = [[str(i + 1), *cells(f), *gate(f)] for i, f in enumerate(folds)]
    rows.append(["all", *cells(total), *([""] if gated else [])])
    return ["## Held-out choices checked on examples they were not fitted on", "",
            f"The held-out split cut into {len(folds)} folds (each class's examples in stored order, cut into "
            f"{len(folds)} runs: for the glyph sources, about one held-out font per fold when there are as many "
            "folds as fonts). Every combine choice (calibration, gate, weights) fitted again on the other folds, "
            "scored on the fold left out; in brackets, examples gained over the generalist. The column fitted "
            "on all held-out data is the held-out accuracy above: where it is higher than the cross-fitted "
            "one, the held-out number flatters the choices.", "",
            md_table(head, rows, align="rr" + "r" * (len(head) - 2)), ""]


def _causes_section(result: CombineResult, splits: list[str]) -> list[str]:
    """Table 4's changes taken apart (combine.diagnose): broken vs fixed examples and who caused them."""
    if not any(result.split(s).table4_causes for s in splits):
        return []
    lines = ["## Table 4 taken apart: examples broken and fixed, and by which specialist", "",
             "*Broken*: the generalist was right, the ensemble is wrong; *fixed*: the reverse. The cause is the "
             "active specialist that moved the true class's probability most in that direction; its kind says "
             "whether the true class is a `core` member of its group (k-means), a member the `overlap` step "
             "added, or outside the group (`dustbin`).", ""]
    for split in splits:
        rows = result.split(split).table4_causes
        if not rows:
            continue
        lines += [f"**{SPLIT_TEXT[split]}**", "", md_table(
            ["# covering", "examples", "broken", "fixed", "broken by core / overlap / dustbin",
             "fixed by core / overlap / dustbin"],
            [[r["covering"], r["examples"], r["broken"], r["fixed"],
              " / ".join(str(r["broken_by"][k]) for k in ("core", "overlap", "dustbin")),
              " / ".join(str(r["fixed_by"][k]) for k in ("core", "overlap", "dustbin"))] for r in rows],
            align="rrrrrr"), ""]
    return lines


def _table4_rows(result: CombineResult, splits: list[str]) -> list[list[str]]:
    by_split = {s: {r["covering"]: r for r in result.split(s).table4} for s in splits}
    coverings = sorted({c for rows in by_split.values() for c in rows}, key=lambda c: int(c.rstrip("+")))
    empty = {"examples": 0, "delta_correct": 0, "relative_change": None}
    rows = []
    for c in coverings:
        cells = [by_split[s].get(c, empty) for s in splits]
        rows.append([c, *(r["examples"] for r in cells), *(f"{r['delta_correct']:+d}" for r in cells),
                     *(_relative(r["relative_change"]) for r in cells)])
    return rows


def plot_table4(result: CombineResult, path: Path) -> None:
    """Paper table 4 as bars: the relative change per coverage count, held-out and test side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in ("val", "test") if s in result.splits]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(splits)
    for i, (split, color) in enumerate(zip(splits, ("tab:gray", "tab:blue"))):
        rows = result.split(split).table4
        x = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(rows))]
        rel = [100 * (r["relative_change"] or 0.0) for r in rows]
        bars = ax.bar(x, rel, width, color=color, label=SPLIT_TEXT[split])
        for bar, r in zip(bars, rows):
            ax.annotate(f"n={r['examples']}\n{r['delta_correct']:+d}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom" if bar.get_height() >= 0 else "top",
                        fontsize=6)
    longest = max((result.split(s).table4 for s in splits), key=len)
    ax.set_xticks(range(len(longest)), [r["covering"] for r in longest])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.25)   # room for the labels
    ax.set_xlabel("number of specialists covering the correct class")
    ax.set_ylabel("relative accuracy change (%)")
    ax.set_title("Table 4: gain of the ensemble over the generalist")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(run: RunDir, result: CombineResult) -> None:
    plot_table4(result, run.table4_figure)
    write_text(run.combine_report, render_markdown(result))
