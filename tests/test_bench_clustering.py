"""benchmarks/bench_clustering.py temperatures: the held-out probe behind clustering.temperature."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import yaml

from clustering.predictions import soften
from specdistill.rundir import RunDir
from testkit.synthetic_predictions import make_synthetic_predictions

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_clustering", ROOT / "benchmarks" / "bench_clustering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(out: str, temperature: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| {temperature} | 20 |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_temperatures_show_a_sharp_generalists_lost_groups_and_softening_finds_them(tmp_path, capsys):
    """Planted groups behind a sharp generalist (rows raised to the power 8): at T = 1 k-means makes a
    giant group, dropped by max_size, and covers few classes; at T = 8 every class is in one of 20
    groups of the planted size and far more of the held-out errors fall inside one group."""
    planted = make_synthetic_predictions(120, 6000, 6, mates_per_row=4, dense=True, seed=3)
    run = RunDir.at(tmp_path / "run")
    run.generalist.mkdir(parents=True)
    with np.errstate(divide="ignore"):   # log(0) = -inf: a valid log-probability
        np.save(RunDir.preds_in(run.generalist, "val"), np.log(soften(planted.probs, 1 / 8)))
    np.save(run.generalist_labels("val"), planted.labels)
    cfg = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["clustering"] = {"k": 20, "min_size": 2, "max_size": 30, "backend": "sklearn"}
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _script().main(["temperatures", str(run.root), "--config", str(config), "--temperatures", "1", "8",
                    "--k", "20"])
    out = capsys.readouterr().out
    sharp, soft = _row(out, "1"), _row(out, "8")
    kept, dropped, largest, median, covered, caught, caught_2fold = range(2, 9)
    assert int(sharp[dropped].split()[0]) >= 1 and int(sharp[covered]) < 90
    assert soft[kept] == "20" and soft[dropped] == "0 (0)" and soft[covered] == "120"
    assert soft[largest] == soft[median] == "6"
    pct = lambda cell: float(cell.rstrip("%"))  # noqa: E731
    assert pct(soft[caught]) > pct(sharp[caught]) + 30 and pct(soft[caught_2fold]) > pct(sharp[caught_2fold]) + 30
