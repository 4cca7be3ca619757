"""Stage 4: run the generalist and the specialists once on the test split, combine, and report.

``python -m combine.evaluate --config X [--run-dir D] [--set combine.top_n=2]`` (or
``specdistill combine``) writes ``combine/eval.json``, ``combine/report.md`` with paper tables 3
and 4, ``combine/table4.png`` and ``combine/preds-test.npy`` (log q of the configured combiner).
:func:`evaluate_predictions` does all the numbers from arrays, for users with their own models.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from combine.activation import active_specialists, coverage
from combine.baselines import average_of_distributions, product_of_experts
from combine.calibration import FILE as CALIBRATION_FILE
from combine.calibration import apply_temperature, fit_temperature
from combine.kl import kl_combine
from combine.metrics import system_metrics, table4, top1_correct
from combine.report import write_report
from specdistill.artifacts import is_done, mark_done, read_json, read_npy, require_done, write_json, write_npy
from specdistill.config import Config, stage_hash
from specdistill.errors import SpecdistillError, exit_on_error

TOP_N_COMPARED = (1, 2, 3)


def evaluate_predictions(gen_log_probs, groups: Sequence, spec_log_probs: Sequence, labels,
                         top_n: int = 1, solver: str = "fixed_point", max_iter: int = 200,
                         tol: float = 1e-9, keep_predictions: bool = False) -> dict:
    """Every number of the combine report from the models' outputs on one labelled split.

    ``spec_log_probs`` are dustbin-corrected log-probabilities for every example (as for
    :func:`combine.kl_combine`). Systems: the generalist alone, the KL combiner with the
    generalist's top-n for n in {1, 2, 3} (and ``top_n``), and the average / product of the
    available distributions with the ``top_n`` active set. ``kl_top{top_n}`` is the ensemble of
    tables 3 and 4 (``result["ensemble"]["system"]``). With ``keep_predictions`` the result also
    holds ``"predictions"``: {system: [N, K] log-probabilities} (not JSON; pop it before writing).
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
    for n in sorted({*TOP_N_COMPARED, top_n}):
        began = time.perf_counter()
        lq, info = kl_combine(gen, groups, spec_log_probs, top_n=n, solver=solver, max_iter=max_iter,
                              tol=tol, return_info=True)
        timings[f"kl_top{n}_s"] = time.perf_counter() - began
        predictions[f"kl_top{n}"] = lq
        active_sets[n], iterations[n] = info["active"], info["iterations"]
    active = active_sets[top_n]
    predictions["average"] = average_of_distributions(gen, groups, spec_log_probs, active)
    predictions["product"] = product_of_experts(gen, groups, spec_log_probs, active)

    specialist_classes = torch.unique(torch.cat(groups)) if groups else torch.zeros(0, dtype=torch.int64)
    systems = {name: system_metrics(lp, labels, specialist_classes) for name, lp in predictions.items()}
    main = f"kl_top{top_n}"
    covering = coverage(labels, groups, K) if groups else torch.zeros_like(labels)
    n_active = active.sum(dim=1)
    used = iterations[top_n][n_active > 0]
    result = {
        "num_examples": int(len(labels)),
        "num_classes": K,
        "num_specialists": len(groups),
        "top_n": top_n,
        "solver": solver,
        "ensemble": {"system": main, "test_acc": systems[main]["accuracy"],
                     "conditional_acc": systems[main]["conditional_accuracy"]},
        "systems": systems,
        "table3": {
            "generalist_acc": systems["generalist"]["accuracy"],
            "ensemble_acc": systems[main]["accuracy"],
            "generalist_conditional_acc": systems["generalist"]["conditional_accuracy"],
            "ensemble_conditional_acc": systems[main]["conditional_accuracy"],
            "conditional_examples": int(torch.isin(labels, specialist_classes).sum()),
        },
        "table4": table4(top1_correct(gen, labels), top1_correct(predictions[main], labels), covering),
        "active_specialists": {
            "mean": float(n_active.double().mean()) if len(labels) else 0.0,
            "none": float((n_active == 0).double().mean()) if len(labels) else 0.0,
            "histogram": {str(k): int(v) for k, v in enumerate(torch.bincount(n_active).tolist())},
            "solver_iterations_mean": float(used.double().mean()) if used.numel() else 0.0,
            "solver_iterations_max": int(used.max()) if used.numel() else 0,
        },
        "timings": timings,
    }
    if keep_predictions:
        result["predictions"] = predictions
    return result


def run_combine(cfg: Config, force: bool = False) -> dict:
    """The pipeline's combine stage; skipped (returning the stored result) when already done.

    The generalist runs on every test image; each specialist only on the images where the
    generalist's top-1, 2 or 3 (or the configured top-n) activates it, all that any compared system
    reads.
    """
    from specdistill.data import load_data
    from specdistill.engine import predict_log_probs, resolve_device
    from specdistill.models import load_classifier
    from specialists.dustbin import specialist_log_probs  # the one place the correction is applied
    from specialists.sampler import fold_labels
    from specialists.store import info_path, load_specialist

    run = cfg.run_path
    out_dir = run / "combine"
    config_hash = stage_hash(cfg, "combine")
    if not force and is_done(run, "combine", config_hash):
        result = read_json(out_dir / "eval.json")
        print(f"combine: already done in {out_dir} (config hash {config_hash}). Use --force to redo.")
        return result
    require_done(run, "generalist", stage_hash(cfg, "generalist"))
    spec_done = require_done(run, "specialists", stage_hash(cfg, "specialists"))
    device = resolve_device(cfg.device)
    gen_model, gen_meta = load_classifier(run / "generalist" / "model.safetensors", device)
    K = int(gen_meta["num_classes"])
    data = load_data(cfg.data, cfg.seed)
    test = data.test
    if len(test) == 0:
        raise SpecdistillError("the test split is empty; check data.limit and the data source")
    if int(test.labels.max()) >= K:
        raise SpecdistillError(f"the test split has class {int(test.labels.max())} but the generalist has {K} "
                               "classes; the run directory was made with other data, use a new one")
    batch = cfg.generalist.train.eval_batch_size

    forward: dict = {"images": len(test)}
    began = time.perf_counter()
    gen_lp = torch.as_tensor(predict_log_probs(gen_model, test.images, batch, device))
    forward["generalist_s"] = time.perf_counter() - began
    del gen_model
    ids = spec_done.get("ids")
    if not ids:
        raise SpecdistillError(f"{run / 'specialists' / 'done.json'} lists no specialists; rerun that stage")
    groups = []
    for m in ids:
        info = read_json(info_path(run / "specialists", m))
        bad = [c for c in info.get("classes", []) if not isinstance(c, int) or not 0 <= c < K]
        if bad or not info.get("classes"):
            raise SpecdistillError(f"specialist {m} names class {bad[0] if bad else None} but the generalist has "
                                   f"{K} classes; rerun the specialists stage for this generalist")
        groups.append(torch.as_tensor(info["classes"], dtype=torch.int64))
    # a specialist runs only where some compared top-n activates it; the rows it skips are never read
    needed = torch.zeros(len(test), len(ids), dtype=torch.bool)
    for n in {*TOP_N_COMPARED, cfg.combine.top_n}:
        needed |= active_specialists(gen_lp, groups, n)
    calibration = None
    if cfg.combine.calibrate:   # temperatures fitted on the held-out split, never on test
        val_gen = read_npy(run / "generalist" / "preds-val.npy")
        val_gen = torch.log_softmax(torch.as_tensor(np.asarray(val_gen), dtype=torch.float32), dim=1)
        val_active = active_specialists(val_gen, groups, cfg.combine.top_n)
        calibration = {"split": "val", "generalist": fit_temperature(val_gen, data.val.labels), "specialists": []}
        gen_lp = apply_temperature(gen_lp, calibration["generalist"])
    spec_lps, spec_times = [], []
    for j, (m, group) in enumerate(zip(ids, groups)):
        model, info = load_specialist(run / "specialists", m, device)
        correction = float(info["dustbin_correction"])
        tau = 1.0
        if calibration is not None:
            hit = val_active[:, j].numpy()
            if hit.any():
                tau = fit_temperature(specialist_log_probs(model, data.val.images[hit], correction, batch, device),
                                      fold_labels(data.val.labels[hit], group.numpy()))
            calibration["specialists"].append(tau)
        rows = needed[:, j].nonzero().squeeze(1).numpy()
        lp = torch.zeros(len(test), len(group) + 1)
        began = time.perf_counter()
        if len(rows):
            lp[rows] = specialist_log_probs(model, test.images[rows], correction, batch, device, tau).cpu()
        spec_times.append(time.perf_counter() - began)
        spec_lps.append(lp)
        del model
    if calibration is not None:
        write_json(out_dir / CALIBRATION_FILE, calibration)
        taus = np.array(calibration["specialists"])
        print(f"combine: temperatures on held-out data: generalist {calibration['generalist']:.2f}, specialists "
              f"median {np.median(taus):.2f} (range {taus.min():.2f}-{taus.max():.2f})")
    forward["specialists_s"] = float(sum(spec_times))
    forward["specialist_images"] = int(needed.sum())
    forward["num_specialists"] = len(ids)

    c = cfg.combine
    result = evaluate_predictions(gen_lp, groups, spec_lps, test.labels, top_n=c.top_n, solver=c.solver,
                                  max_iter=c.max_iter, tol=c.tol, keep_predictions=True)
    predictions = result.pop("predictions")
    result["timings"]["forward"] = forward
    result["specialist_ids"] = list(ids)
    write_npy(out_dir / "preds-test.npy", predictions[result["ensemble"]["system"]].float().numpy())
    write_json(out_dir / "eval.json", result)
    write_report(out_dir, result)
    mark_done(run, "combine", config_hash, ensemble_acc=result["table3"]["ensemble_acc"])
    for line in summary_lines(result):
        print("combine: " + line)
    return result


def summary_lines(result: dict) -> list[str]:
    t3 = result["table3"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    return [f"test accuracy {pct(t3['generalist_acc'])} (generalist) -> {pct(t3['ensemble_acc'])} "
            f"(+ {result['num_specialists']} specialists); conditional {pct(t3['generalist_conditional_acc'])}"
            f" -> {pct(t3['ensemble_conditional_acc'])}"]


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from specdistill.cli import config_from_args, prepare_run_dir, setup_environment, stage_parser

    setup_environment()
    parser = stage_parser("Combine the generalist and specialists on the test split; paper tables 3 and 4.")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    prepare_run_dir(cfg)
    run_combine(cfg, force=args.force)
    print(f"wrote {cfg.run_path / 'combine' / 'report.md'}")


if __name__ == "__main__":
    main()

