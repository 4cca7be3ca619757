"""The JFT-shaped run (configs/jft-shaped.yaml) end to end at several label-space sizes: per stage the
wall time, the peak memory (max RSS of the stage's process, from GNU time) and the bytes the stage
left in the run directory.

    python benchmarks/bench_scale.py                          # K = 1,000 / 5,000 / 15,000
    python benchmarks/bench_scale.py --classes 15000 --stages generalist clustering
    python benchmarks/bench_scale.py --config configs/quickstart.yaml --classes 0   # a config as it is

Each stage runs alone (``specdistill run CONFIG --from S --until S``) in a fresh run directory per
K, so its numbers are its own. The specialists' peak is the Ray driver's: the Ray workers are not
its children (the report's own "Time and memory" section has each task's). Planted families keep
250 classes and k-means gets one group per family (``clustering.k = K / 250``), grown to 300.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generalist", "clustering", "specialists", "combine", "student")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_stage(config: str, run_dir: Path, stage: str, overrides: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "specdistill.cli", "run", config, "--run-dir", str(run_dir),
           "--from", stage, "--until", stage, "--set", "specialists.ray_address=local"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise SystemExit(f"{stage} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return {"seconds": seconds, "rss_mib": int(rss.group(1)) / 1024 if rss else float("nan"),
            "stage_mib": folder_bytes(run_dir / stage) / 2**20, "run_mib": folder_bytes(run_dir) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/jft-shaped.yaml")
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 5000, 15000],
                        help="label-space sizes (0: the config's own)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE")
    parser.add_argument("--keep", help="keep the run directories under this folder")
    args = parser.parse_args()

    where = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"## {args.config}: per stage wall time, peak RSS (MiB) and bytes written (MiB)\n")
    print("| K | stage | seconds | peak RSS MiB | stage folder MiB | run directory MiB |")
    print("|---|---|---|---|---|---|")
    try:
        for k in args.classes:
            overrides = list(args.overrides)
            if k:
                overrides += [f"data.num_classes={k}", f"clustering.k={max(2, k // 250)}"]
            run_dir = where / f"K{k}"
            shutil.rmtree(run_dir, ignore_errors=True)
            for stage in args.stages:
                r = run_stage(args.config, run_dir, stage, overrides)
                print(f"| {k or 'config'} | {stage} | {r['seconds']:.1f} | {r['rss_mib']:.0f} | {r['stage_mib']:.1f} "
                      f"| {r['run_mib']:.1f} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
