"""Stage 4: run the generalist and the specialists once on the held-out and test splits, combine, report.

``python -m combine.evaluate --config X [--run-dir D] [--set combine.top_n=2]`` (or
``specdistill combine``) writes ``combine/eval.json``, ``combine/report.md`` with paper tables 3
and 4 (held-out beside test), ``combine/table4.png`` and ``combine/preds-{val,test}.npy`` (log q of
the configured combiner; ``preds-*-topk.npz`` where large: ``specdistill/predictions.py``).
:func:`evaluate_predictions` does all the numbers from arrays, for users with their own models.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from combine.activation import active_specialists, coverage
from combine.baselines import average_of_distributions, product_of_experts
from combine.calibration import Calibration, fit_calibration
from combine.diagnose import table4_causes
from combine.ensemble import Ensemble
from combine.gating import Gate, fit_gate
from combine.kl import kl_combine
from combine.metrics import system_metrics, table4, top1_correct
from combine.report import write_report
from specdistill.config import CombineConfig, Config, GeneralistConfig, stage_hash
from specdistill.data import Dataset, Split
from specdistill.engine import predict_logits, resolve_device
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.formatting import percent
from specdistill.predictions import StoredPredictions, choose_form, write_predictions
from specdistill.provenance import is_done, mark_done, require_done
from specdistill.records import CombineResult, SplitEvaluation
from specdistill.rundir import SPLITS, RunDir

TOP_N_COMPARED = (1, 2, 3)


def evaluate_split(gen_log_probs, groups: Sequence, spec_log_probs: Sequence, labels, rule: CombineConfig,
                   num_core: Sequence[int] | None = None, gate: Gate | None = None
                   ) -> tuple[SplitEvaluation, dict[str, torch.Tensor]]:
    """Every number of the combine report from the models' outputs on one labelled split.

    ``spec_log_probs`` are dustbin-corrected log-probabilities for every example (as for
    :func:`combine.kl_combine`). Systems: the generalist alone, the KL combiner with the
    generalist's top-n for n in {1, 2, 3} (and ``rule.top_n``), and the average / product of the
    available distributions with the ``rule.top_n`` active set. Table 4's changes are traced to the
    specialists that caused them (:mod:`combine.diagnose`; ``num_core``: each group's k-means members,
    listed first). With a ``gate`` (:mod:`combine.gating`) every KL system uses the gated active
    set, and the ungated ensemble is reported beside it. Also returns each system's [N, K]
    log-probabilities.
    """
    gen = torch.as_tensor(np.asarray(gen_log_probs)) if not isinstance(gen_log_probs, torch.Tensor) \
        else gen_log_probs
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if gen.dim() != 2 or labels.shape != (gen.shape[0],):
        raise SpecdistillError(f"labels have shape {tuple(labels.shape)} for predictions of shape "
                               f"{tuple(gen.shape)}; pass one label per row")
    K = gen.shape[1]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise SpecdistillError(f"labels must be class ids in 0..{K - 1}; got {int(labels.min())}..{int(labels.max())}")
    groups = [torch.as_tensor(np.asarray(g), dtype=torch.int64) for g in groups]
    predictions = {"generalist": gen}
    timings, active_sets, iterations = {}, {}, {}
    gated = gate is not None and gate.kind != "none"
    for n in sorted({*TOP_N_COMPARED, rule.top_n}):
        began = time.perf_counter()
        mask = gate.apply(active_specialists(gen, groups, n), gen) if gated else None
        lq, info = kl_combine(gen, groups, spec_log_probs, top_n=n, solver=rule.solver, max_iter=rule.max_iter,
                              tol=rule.tol, active=mask, return_info=True)
        timings[f"kl_top{n}_s"] = time.perf_counter() - began
        predictions[f"kl_top{n}"] = lq
        active_sets[n], iterations[n] = info["active"], info["iterations"]
    if gated:   # what the gate changed, on the same examples
        predictions[f"{ensemble_system(rule)}_ungated"] = kl_combine(
            gen, groups, spec_log_probs, top_n=rule.top_n, solver=rule.solver, max_iter=rule.max_iter, tol=rule.tol)
    active = active_sets[rule.top_n]
    predictions["average"] = average_of_distributions(gen, groups, spec_log_probs, active)
    predictions["product"] = product_of_experts(gen, groups, spec_log_probs, active)

    specialist_classes = torch.unique(torch.cat(groups)) if groups else torch.zeros(0, dtype=torch.int64)
    systems = {name: system_metrics(lp, labels, specialist_classes) for name, lp in predictions.items()}
    covering = coverage(labels, groups, K) if groups else torch.zeros_like(labels)
    n_active = active.sum(dim=1)
    used = iterations[rule.top_n][n_active > 0]
    main = predictions[ensemble_system(rule)]
    evaluation = SplitEvaluation(
        num_examples=int(len(labels)),
        systems=systems,
        table4=table4(top1_correct(gen, labels), top1_correct(main, labels), covering),
        table4_causes=table4_causes(gen, main, labels, groups, spec_log_probs, active, covering, num_core),
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
    return evaluation, predictions


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
    it, all that any compared system reads.
    """
    run = RunDir.of(cfg)
    config_hash = stage_hash(cfg, "combine")
    if not force and is_done(run.root, "combine", config_hash):
        print(f"combine: already done in {run.combine} (config hash {config_hash}). Use --force to redo.")
        return CombineResult.read(run.combine_eval)
    ensemble, data = load_ensemble_and_data(cfg, run)
    if cfg.combine.calibrate:   # temperatures fitted on the held-out split, never on test
        ensemble.calibration = calibrate(ensemble, run, data, cfg.combine)
    outputs = {split: run_models(ensemble, data.split(split), cfg.combine) for split in SPLITS}
    if cfg.combine.gate != "none":   # chosen on the held-out split, applied unchanged to test
        gen, specs, _ = outputs["val"]
        ensemble.gate = fit_gate(cfg.combine.gate, gen, ensemble.groups, specs, data.val.labels, cfg.combine)
    evaluations, predictions = {}, {}
    for split, (gen, specs, forward) in outputs.items():
        evaluations[split], systems = evaluate_split(gen, ensemble.groups, specs, data.split(split).labels,
                                                     cfg.combine, ensemble.num_core, ensemble.gate)
        evaluations[split].timings["forward"] = forward
        predictions[split] = systems[ensemble_system(cfg.combine)]
    result = CombineResult(num_classes=ensemble.num_classes, num_specialists=len(ensemble), top_n=cfg.combine.top_n,
                           solver=cfg.combine.solver, ensemble=ensemble_system(cfg.combine),
                           splits=evaluations, specialist_ids=ensemble.ids,
                           gate=asdict(ensemble.gate) if ensemble.gate.kind != "none" else None)
    write_combine(run, result, predictions, ensemble, cfg.generalist)
    mark_done(run.root, "combine", config_hash)
    for line in summary_lines(result):
        print("combine: " + line)
    return result


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


def calibrate(ensemble: Ensemble, run: RunDir, data: Dataset, rule: CombineConfig) -> Calibration:
    """Temperatures on the held-out split, from the generalist's stored held-out predictions (where
    they are stored whole; the top-k form of a large K keeps only each row's top classes, so then from
    the generalist's own forward pass)."""
    stored = StoredPredictions.open(run.generalist, "val")
    if stored.form == "dense":
        val_gen = torch.log_softmax(torch.as_tensor(stored.dense(), dtype=torch.float32), dim=1)
    else:
        val_gen = torch.log_softmax(predict_logits(ensemble.generalist, data.val.images, ensemble.batch_size,
                                                   ensemble.device), dim=1)
    calibration = fit_calibration(ensemble, val_gen, data.val.images, data.val.labels, rule.top_n)
    taus = np.array(calibration.specialists)
    print(f"combine: temperatures on held-out data: generalist {calibration.generalist:.2f}, specialists "
          f"median {np.median(taus):.2f} (range {taus.min():.2f}-{taus.max():.2f})")
    return calibration


def run_models(ensemble: Ensemble, split: Split, rule: CombineConfig
               ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
    """The generalist on every image of ``split``, each specialist where any compared top-n activates it
    (all that any compared system, gated or not, reads); with the forward timings."""
    forward: dict[str, Any] = {"images": len(split)}
    began = time.perf_counter()
    gen_lp = ensemble.generalist_log_probs(split.images)
    forward["generalist_s"] = time.perf_counter() - began
    needed = torch.zeros(len(split), len(ensemble), dtype=torch.bool)
    for n in {*TOP_N_COMPARED, rule.top_n}:
        needed |= active_specialists(gen_lp, ensemble.groups, n)
    began = time.perf_counter()
    spec_lps = ensemble.specialist_outputs(split.images, needed)
    forward.update(specialists_s=time.perf_counter() - began, specialist_images=int(needed.sum()),
                   num_specialists=len(ensemble))
    return gen_lp, spec_lps, forward


def write_combine(run: RunDir, result: CombineResult, predictions: dict[str, torch.Tensor],
                  ensemble: Ensemble, gcfg: GeneralistConfig | None = None) -> None:
    """Every file of the stage but done.json: calibration and gate (what the student's teacher applies),
    the ensemble's predictions (stored as ``gcfg``'s predictions options say), eval.json, the report."""
    gcfg = gcfg or GeneralistConfig()
    for path, record, used in ((run.calibration, ensemble.calibration, ensemble.calibration.split != "none"),
                               (run.gating, ensemble.gate, ensemble.gate.kind != "none")):
        if used:
            record.write(path)
        else:
            path.unlink(missing_ok=True)   # a previous run's choice must not outlive it
    for split, log_q in predictions.items():   # dense where small, else each row's top-k (specdistill.predictions)
        n, num_classes = log_q.shape
        form = choose_form(gcfg, {split: n}, num_classes)
        write_predictions(run.combine, split, (log_q[i:i + 4096].float().numpy() for i in range(0, n, 4096)),
                          n, num_classes, form, gcfg.predictions_top_k)
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

