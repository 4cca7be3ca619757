"""The JFT-shaped run (configs/jft-shaped.yaml) end to end: per stage the wall time, the peak memory
(max RSS of the stage's process, from GNU time) and the bytes the stage left in the run directory,
beside the same numbers for the quickstart; the models' forward time beside the combiner's; and a
run killed in the specialists stage, then rerun.

    python benchmarks/bench_scale.py                   # everything below (about 45 min on 2 cores)
    python benchmarks/bench_scale.py --parts sweep --classes 1000 15000 --stages generalist combine

Parts:

* ``sweep``: K = 1,000 / 5,000 / 15,000 at a fixed number of examples (60,000 training images:
  ``data.examples_per_class = 60000 / K``; held-out and test cut to 15,000 each by ``data.eval_limit``),
  so each stage's peak memory can be read against K alone. Planted families keep 250 classes and
  k-means gets one group per family (``clustering.k = K / 250``), grown to 300.
* ``shipped``: the config as it ships (15,000 classes, 30,000 held-out and 30,000 test images).
* ``quickstart``: configs/quickstart.yaml as it ships, the baseline a user knows.
* ``resume``: the shipped config's specialists stage killed (SIGKILL, the whole process group) once a
  third of the specialists are written, then the same command again: how many it trains.

Each stage runs alone (``specdistill run CONFIG --from S --until S``) in a fresh run directory per
setting, so its numbers are its own. Two peaks: the largest single process's (GNU time's max RSS) and
the whole process tree's, sampled by the pipeline itself (``timings.json``: the stage's process and
every descendant, embedded Ray's workers included, summed; shared pages count once per process, so
it is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generalist", "clustering", "specialists", "combine", "student")
PARTS = ("sweep", "shipped", "quickstart", "resume")
FIXED_TRAIN, FIXED_EVAL = 60000, 15000


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def stage_command(config: str, run_dir: Path, stage: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "specdistill.cli", "run", config, "--run-dir", str(run_dir),
           "--from", stage, "--until", stage, "--set", "specialists.ray_address=local"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"}


def run_stage(config: str, run_dir: Path, stage: str, overrides: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-v", *stage_command(config, run_dir, stage, overrides)]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    seconds = time.perf_counter() - began
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise SystemExit(f"{stage} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    timings = json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").exists() else {}
    return {"seconds": seconds, "rss_mib": int(rss.group(1)) / 1024 if rss else float("nan"),
            "tree_mib": timings.get(stage, {}).get("peak_rss_mb", float("nan")),
            "stage_mib": folder_bytes(run_dir / stage) / 2**20, "run_mib": folder_bytes(run_dir) / 2**20}


def combine_times(run_dir: Path) -> list[str]:
    """Per split: the models' forward (generalist on every image, specialists where active) and the
    configured combiner's time, from combine/eval.json."""
    result = json.loads((run_dir / "combine" / "eval.json").read_text())
    system = result["ensemble"]
    rows = []
    for split, evaluation in result["splits"].items():
        timings = evaluation["timings"]
        forward = timings["forward"]
        model_s = forward["generalist_s"] + forward["specialists_s"]
        kl_s = timings[f"{system}_s"]
        rows.append(f"{split} | {forward['images']} | {forward['generalist_s']:.1f} | {forward['specialists_s']:.1f} "
                    f"| {kl_s:.2f} | {100 * kl_s / model_s:.1f}% | {forward.get('generalist_passes', 1)}")
    return rows


def pipeline(label: str, config: str, run_dir: Path, overrides: list[str], stages: list[str],
             forward_rows: list[str]) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    total = 0.0
    for stage in stages:
        r = run_stage(config, run_dir, stage, overrides)
        total += r["seconds"]
        print(f"| {label} | {stage} | {r['seconds']:.1f} | {r['rss_mib']:.0f} | {r['tree_mib']:.0f} "
              f"| {r['stage_mib']:.1f} | {r['run_mib']:.1f} |", flush=True)
        if stage == "combine":
            forward_rows += [f"| {label} | {row} |" for row in combine_times(run_dir)]
    print(f"| {label} | **all stages** | **{total:.0f}** | | | | {folder_bytes(run_dir) / 2**20:.1f} |", flush=True)


def kill_and_resume(config: str, run_dir: Path, overrides: list[str]) -> None:
    """Kill the specialists stage once a third of its specialists are written, rerun it, report."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for stage in ("generalist", "clustering"):
        run_stage(config, run_dir, stage, overrides)
    groups = len(json.loads((run_dir / "clustering" / "clusters.json").read_text())["groups"])
    cmd = stage_command(config, run_dir, "specialists", overrides)
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    written = 0
    while proc.poll() is None and written < groups // 3:
        time.sleep(1.0)
        written = len(list((run_dir / "specialists").glob("[0-9]*.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - began
    time.sleep(2.0)
    began = time.perf_counter()
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    rerun_s = time.perf_counter() - began
    said = re.search(r"specialists: (\d+) to train, (\d+) already finished", again.stdout)
    done = (run_dir / "specialists" / "done.json").exists()
    print(f"\nKilled (SIGKILL, process group) after {killed_after:.0f} s with {written} of {groups} specialists "
          f"written; the rerun said: \"{said.group(0) if said else 'no plan line'}\", exit {again.returncode}, "
          f"{rerun_s:.0f} s, stage finished: {done}", flush=True)
    if again.returncode != 0 or not done or not said or int(said.group(2)) < written:
        tail = (again.stdout + again.stderr).strip().splitlines()[-12:]
        raise SystemExit("the rerun did not resume the killed stage:\n" + "\n".join(tail))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/jft-shaped.yaml")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 5000, 15000], help="the sweep's K")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE")
    parser.add_argument("--keep", help="keep the run directories under this folder")
    args = parser.parse_args()

    where = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"## {args.config}: per stage wall time, peak RSS (MiB) and bytes written (MiB)\n")
    print("| run | stage | seconds | peak RSS MiB | process tree peak MiB | stage folder MiB | run directory MiB |")
    print("|---|---|---|---|---|---|---|")
    forward_rows: list[str] = []
    began = time.perf_counter()
    try:
        if "sweep" in args.parts:
            for k in args.classes:
                overrides = [*args.overrides, f"data.num_classes={k}", f"clustering.k={max(2, k // 250)}",
                             f"data.examples_per_class={max(1, FIXED_TRAIN // k)}", f"data.eval_limit={FIXED_EVAL}"]
                pipeline(f"K={k:,}, N fixed", args.config, where / f"K{k}", overrides, args.stages, forward_rows)
        if "shipped" in args.parts:
            pipeline("jft-shaped as shipped", args.config, where / "shipped", args.overrides, args.stages,
                     forward_rows)
        if "quickstart" in args.parts:
            pipeline("quickstart", "configs/quickstart.yaml", where / "quickstart", [], args.stages, forward_rows)
        if forward_rows:
            print("\n## The models' forward pass beside the combiner (combine/eval.json)\n")
            print("| run | split | images | generalist s | specialists s | combiner s | combiner / forward "
                  "| generalist passes |")
            print("|---|---|---|---|---|---|---|---|")
            print("\n".join(forward_rows), flush=True)
        if "resume" in args.parts:
            kill_and_resume(args.config, where / "resume", args.overrides)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
