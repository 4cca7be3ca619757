"""Stage 4: run the generalist and the specialists once on the held-out and test splits, combine, report.

``python -m combine.evaluate --config X [--run-dir D] [--set combine.top_n=2]`` (or
``specdistill combine``) writes ``combine/eval.json``, ``combine/report.md`` with paper tables 3
and 4 (held-out beside test), ``combine/table4.png`` and ``combine/preds-{val,test}.npy`` (log q of
the configured combiner; ``preds-*-topk.npz`` where large: ``specdistill/predictions.py``).
:func:`evaluate_predictions` does all the numbers from arrays, for users with their own models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from combine.activation import coverage
from combine.baselines import average_of_distributions, product_of_experts
from combine.calibration import apply_temperature
from combine.choices import combine_chunk, cross_fit, fit_choices
from combine.diagnose import causes_by_coverage, change_causes
from combine.ensemble import Ensemble
from combine.gating import Gate
from combine.inputs import check_inputs
from combine.kl import kl_combine
from combine.metrics import SystemTally, table4, top1_correct
from combine.outputs import Chunk, SplitOutputs
from combine.report import SPLIT_TEXT, write_report
from combine.rivals import score_rivals, stale_rivals
from specdistill.config import CombineConfig, Config, stage_hash
from specdistill.data import Dataset
from specdistill.engine import resolve_device
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.formatting import percent
from specdistill.predictions import PredictionWriter, choose_form
from specdistill.provenance import is_done, mark_done, require_done
from specdistill.records import CombineResult, SplitEvaluation
from specdistill.rundir import SPLITS, RunDir

TOP_N_COMPARED = (1, 2, 3)


def evaluate_split(gen_log_probs, groups: Sequence, spec_log_probs: Sequence, labels, rule: CombineConfig,
                   num_core: Sequence[int] | None = None, gate: Gate | None = None
                   ) -> tuple[SplitEvaluation, dict[str, torch.Tensor]]:
    """:func:`evaluate_outputs` for outputs a caller holds whole; also returns each system's [N, K]
    log-probabilities. ``spec_log_probs`` are dustbin-corrected log-probabilities for every example
    (as for :func:`combine.kl_combine`)."""
    check_inputs(gen_log_probs, groups, spec_log_probs)
    outputs = SplitOutputs.from_arrays(gen_log_probs, groups, spec_log_probs, labels, top_ns=compared_top_n(rule))
    parts: dict[str, list[torch.Tensor]] = {}
    evaluation = evaluate_outputs(outputs, rule, num_core, gate,
                                  on_chunk=lambda chunk, systems: [parts.setdefault(k, []).append(v)
                                                                   for k, v in systems.items()])
    return evaluation, {name: torch.cat(blocks) for name, blocks in parts.items()}


def evaluate_outputs(outputs: SplitOutputs, rule: CombineConfig, num_core: Sequence[int] | None = None,
                     gate: Gate | None = None,
                     on_chunk: Callable[[Chunk, dict[str, torch.Tensor]], Any] | None = None,
                     desc: str | None = None) -> SplitEvaluation:
    """Every number of the combine report from the models' outputs on one labelled split, a chunk of
    rows at a time (:class:`combine.outputs.SplitOutputs`: memory grows with the chunk, not the split).

    Systems: the generalist alone, the KL combiner with the generalist's top-n for n in {1, 2, 3}
    (and ``rule.top_n``), and the average / product of the available distributions with the
    ``rule.top_n`` active set; with ``rule.alternatives`` off, the generalist and the configured
    combiner only. Table 4's changes are traced to the specialists that caused them
    (:mod:`combine.diagnose`; ``num_core``: each group's k-means members, listed first). With a
    ``gate`` (:mod:`combine.gating`) every KL system uses the gated active set, and the ungated
    ensemble is reported beside it. ``on_chunk(chunk, systems)`` sees every chunk's [rows, K]
    log-probabilities of every system (to store the ensemble's, say); ``desc`` names a progress bar.
    """
    groups, K = outputs.groups, outputs.num_classes
    gated = gate is not None and not gate.is_open
    top_ns = compared_top_n(rule)
    main = ensemble_system(rule)
    specialist_classes = torch.unique(torch.cat(groups)) if groups else torch.zeros(0, dtype=torch.int64)
    names = ["generalist", *(f"kl_top{n}" for n in top_ns), *([f"{main}_ungated"] if gated else []),
             *(["average", "product"] if rule.alternatives else [])]
    tallies = {name: SystemTally(K, specialist_classes) for name in names}
    timings = {f"kl_top{n}_s": 0.0 for n in top_ns}
    gen_right, main_right, kinds, n_active, iterations = [], [], [], [], []
    for chunk in outputs.chunks(desc):
        systems = {"generalist": chunk.gen}
        for n in top_ns:
            began = time.perf_counter()
            lq, active, rule_active, info = combine_chunk(chunk, outputs, rule, n, gate)
            timings[f"kl_top{n}_s"] += time.perf_counter() - began
            systems[f"kl_top{n}"] = lq
            if n == rule.top_n:
                main_active, main_iterations, main_rule_active = active, info["iterations"], rule_active
                systems[main] = apply_temperature(lq, outputs.calibration.ensemble)   # identity unless fitted
        if gated:   # what the gate changed, on the same examples
            systems[f"{main}_ungated"] = kl_combine(chunk.gen, groups, chunk.specs, solver=rule.solver,
                                                    max_iter=rule.max_iter, tol=rule.tol, active=main_rule_active)
        if rule.alternatives:
            systems["average"] = average_of_distributions(chunk.gen, groups, chunk.specs, main_active)
            systems["product"] = product_of_experts(chunk.gen, groups, chunk.specs, main_active)
        for name, lp in systems.items():
            tallies[name].add(lp, chunk.labels)
        gen_right.append(top1_correct(chunk.gen, chunk.labels))
        main_right.append(top1_correct(systems[main], chunk.labels))
        kinds.append(change_causes(chunk.gen, systems[main], chunk.labels, groups, chunk.specs, main_active,
                                   num_core))
        n_active.append(main_active.sum(dim=1))
        iterations.append(main_iterations)
        if on_chunk is not None:
            on_chunk(chunk, systems)
    labels = outputs.labels
    gen_right, main_right, kinds, n_active, iterations = (
        torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
        for parts, dtype in ((gen_right, torch.bool), (main_right, torch.bool), (kinds, torch.long),
                             (n_active, torch.long), (iterations, torch.long)))
    covering = coverage(labels, groups, K) if groups else torch.zeros_like(labels)
    used = iterations[n_active > 0]
    return SplitEvaluation(
        num_examples=int(len(labels)),
        systems={name: tally.result() for name, tally in tallies.items()},
        table4=table4(gen_right, main_right, covering),
        table4_causes=causes_by_coverage(gen_right, main_right, kinds, covering),
        conditional_examples=int(torch.isin(labels, specialist_classes).sum()),
        active_specialists={
            "mean": float(n_active.double().mean()) if len(labels) else 0.0,
            "none": float((n_active == 0).double().mean()) if len(labels) else 0.0,
            "histogram": {str(k): int(v) for k, v in enumerate(torch.bincount(n_active).tolist())},
            "solver_iterations_mean": float(used.double().mean()) if used.numel() else 0.0,
            "solver_iterations_max": int(used.max()) if used.numel() else 0,
        },
        timings=timings,
    )


def compared_top_n(rule: CombineConfig) -> list[int]:
    """The top-n activations scored: 1, 2, 3 and the configured one, or that one alone."""
    return sorted({*TOP_N_COMPARED, rule.top_n}) if rule.alternatives else [rule.top_n]


def ensemble_system(rule: CombineConfig) -> str:
    """The system of tables 3 and 4: the KL combiner with the configured top-n."""
    return f"kl_top{rule.top_n}"


def evaluate_predictions(gen_log_probs, groups: Sequence, spec_log_probs: Sequence, labels,
                         top_n: int = 1, solver: str = "fixed_point", max_iter: int = 200,
                         tol: float = 1e-9, split: str = "test") -> CombineResult:
    """The combine stage's result from arrays, for users who run their own models (see :func:`evaluate_split`)."""
    rule = CombineConfig(top_n=top_n, solver=solver, max_iter=max_iter, tol=tol)
    evaluation, _ = evaluate_split(gen_log_probs, groups, spec_log_probs, labels, rule)
    K = np.asarray(gen_log_probs).shape[1] if not isinstance(gen_log_probs, torch.Tensor) else gen_log_probs.shape[1]
    return CombineResult(num_classes=int(K), num_specialists=len(groups), top_n=top_n, solver=solver,
                         ensemble=ensemble_system(rule), splits={split: evaluation},
                         specialist_ids=list(range(len(groups))))


# ---------------------------------------------------------------------------------------------- the stage


def run_combine(cfg: Config, force: bool = False) -> CombineResult:
    """The pipeline's combine stage; skipped (returning the stored result) when already done.

    Steps: load the ensemble and the data, calibrate on the held-out split (if configured),
    evaluate on the held-out and the test split, write. Every combine choice is made on the
    held-out numbers; the test split only gives the reported ones. On each split the generalist
    runs on every image, each specialist only on the images where some compared top-n activates
    it, all that any compared system reads; every step then reads them a chunk of rows at a time
    (:mod:`combine.outputs`), so memory is bounded at any number of examples.
    """
    run = RunDir.of(cfg)
    config_hash = stage_hash(cfg, "combine")
    if not force and is_done(run.root, "combine", config_hash):
        print(f"combine: already done in {run.combine} (config hash {config_hash}). Use --force to redo.")
        result = CombineResult.read(run.combine_eval)
        if add_after_the_fact(cfg, run, result):
            result.write(run.combine_eval)
            write_report(run, result)
        return result
    ensemble, data = load_ensemble_and_data(cfg, run)
    top_ns = compared_top_n(cfg.combine)
    outputs, forward = {}, {}
    for split in SPLITS:   # the generalist on every image, each specialist where some compared top-n may use it
        part, forward[split] = data.split(split), {"images": len(data.split(split))}
        outputs[split] = SplitOutputs.from_models(ensemble, part.images, part.labels, top_ns,
                                                  cfg.combine.memory_limit_mb * 2**20, forward[split])
    # every choice on the held-out split, never on test; applied unchanged to both splits
    ensemble.calibration, ensemble.gate = fit_choices(outputs["val"], cfg.combine)
    for split_outputs in outputs.values():
        split_outputs.calibration = ensemble.calibration
    main, evaluations = ensemble_system(cfg.combine), {}
    run.done("combine").unlink(missing_ok=True)   # files are rewritten from here on: done only at the end
    for split, split_outputs in outputs.items():   # dense where small, else each row's top-k (specdistill.predictions)
        n = len(split_outputs)
        writer = PredictionWriter(run.combine, split, n, ensemble.num_classes,
                                  choose_form(cfg.generalist, {split: n}, ensemble.num_classes),
                                  cfg.generalist.predictions_top_k)
        evaluations[split] = evaluate_outputs(split_outputs, cfg.combine, ensemble.num_core, ensemble.gate,
                                              on_chunk=lambda chunk, systems, w=writer: w.add(systems[main]),
                                              desc=f"combine {SPLIT_TEXT[split]}")
        writer.close()
        evaluations[split].timings["forward"] = forward[split] | {
            "generalist_passes": 1 + split_outputs.generalist_passes}
    result = CombineResult(num_classes=ensemble.num_classes, num_specialists=len(ensemble), top_n=cfg.combine.top_n,
                           solver=cfg.combine.solver, ensemble=main,
                           splits=evaluations, specialist_ids=ensemble.ids,
                           gate=None if ensemble.gate.is_open else asdict(ensemble.gate))
    if cfg.combine.cross_fit:   # the same choices fitted on part of the held-out split, scored on the rest
        result.cross_fit = cross_fit(outputs["val"], cfg.combine, cfg.combine.cross_fit,
                                     (ensemble.calibration, ensemble.gate))
    if cfg.combine.rivals:   # the generalist stage's recipe, trained longer and from another seed
        result.rivals = score_rivals(cfg, data, ensemble.ids)
    write_combine(run, result, ensemble)
    mark_done(run.root, "combine", config_hash)
    for line in summary_lines(result):
        print("combine: " + line)
    print_rivals(result)
    return result


def add_after_the_fact(cfg: Config, run: RunDir, result: CombineResult) -> bool:
    """What a finished combine stage is asked for after the fact (options that add records without
    changing its outputs): the rivals, scored again when their folders hold another recipe, and the
    cross-fitted held-out check with the stored calibration and gate. True when ``result`` changed."""
    stale = stale_rivals(cfg, result.rivals) if cfg.combine.rivals and result.rivals else None
    if stale:
        print(f"combine: scoring the rivals again: {stale}")
    rivals = cfg.combine.rivals and (result.rivals is None or stale is not None)
    folds = cfg.combine.cross_fit
    crossed = bool(folds) and (result.cross_fit or {}).get("folds") != folds
    if not (rivals or crossed):
        return False
    if crossed:
        ensemble, data = load_ensemble_and_data(cfg, run)
        ensemble.read_choices(run, cfg.combine)
        val = SplitOutputs.from_models(ensemble, data.val.images, data.val.labels, [cfg.combine.top_n],
                                       cfg.combine.memory_limit_mb * 2**20)
        result.cross_fit = cross_fit(val, cfg.combine, folds, (ensemble.calibration, ensemble.gate))
    else:
        from specdistill.data import load_data  # looked up at call time: tests swap in their own data

        data = load_data(cfg.data, cfg.seed)
    if rivals:
        result.rivals = score_rivals(cfg, data, result.specialist_ids)
        print_rivals(result)
    return True


def load_ensemble_and_data(cfg: Config, run: RunDir) -> tuple[Ensemble, Dataset]:
    """The finished upstream stages of this config, checked against the data they will be scored on."""
    require_done(run.root, "generalist", stage_hash(cfg, "generalist"))
    require_done(run.root, "specialists", stage_hash(cfg, "specialists"))
    from specdistill.data import load_data  # looked up at call time: tests swap in their own data

    ensemble = Ensemble.load(run, resolve_device(cfg.device), cfg.generalist.train.eval_batch_size)
    data = load_data(cfg.data, cfg.seed)
    for split in SPLITS:
        part = data.split(split)
        if len(part) == 0:
            raise SpecdistillError(f"the {split} split is empty; check data.limit and the data source")
        if int(part.labels.max()) >= ensemble.num_classes:
            raise SpecdistillError(f"the {split} split has class {int(part.labels.max())} but the generalist has "
                                   f"{ensemble.num_classes} classes; the run directory was made with other data, "
                                   "use a new one")
    return ensemble, data


def write_combine(run: RunDir, result: CombineResult, ensemble: Ensemble) -> None:
    """The stage's records but its predictions and done.json: calibration and gate (what the student's
    teacher applies), eval.json, the report."""
    for path, record, used in ((run.calibration, ensemble.calibration, ensemble.calibration.split != "none"),
                               (run.gating, ensemble.gate, not ensemble.gate.is_open)):
        if used:
            record.write(path)
        else:
            path.unlink(missing_ok=True)   # a previous run's choice must not outlive it
    result.write(run.combine_eval)
    write_report(run, result)


def summary_lines(result: CombineResult) -> list[str]:
    lines = []
    for split in (s for s in SPLITS if s in result.splits):
        t3 = {k: percent(v, 2, "n/a") for k, v in result.table3(split).items() if k != "conditional_examples"}
        lines.append(f"{'held-out' if split == 'val' else 'test'} accuracy {t3['generalist_acc']} (generalist) -> "
                     f"{t3['ensemble_acc']} (+ {result.num_specialists} specialists); conditional "
                     f"{t3['generalist_conditional_acc']} -> {t3['ensemble_conditional_acc']}")
    return lines


def print_rivals(result: CombineResult) -> None:
    if result.rivals:
        longer, seeds = result.rivals["longer"], result.rivals["seeds"]
        for split in (s for s in SPLITS if s in result.splits):
            print(f"combine: {SPLIT_TEXT[split]} accuracy of the rivals: generalist trained {longer['epochs']} epochs "
                  f"{percent(longer[split], 2)}, mean of generalists (seeds {seeds['seeds']}) "
                  f"{percent(seeds[split], 2)}; the ensemble {percent(result.ensemble_acc(split), 2)}")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser

    setup_environment()
    parser = stage_parser("Combine the generalist and specialists on the test split; paper tables 3 and 4.")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    prepare_run_dir(cfg, force=args.force)
    run_combine(cfg, force=args.force)
    print(f"wrote {RunDir.of(cfg).combine_report}")


if __name__ == "__main__":
    main()

