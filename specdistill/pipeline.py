"""``specdistill run CONFIG``: every stage in one run directory, each skipped when already done.

Stages are found by module name (this package imports no stage at import time) and talk only
through the run directory, so ``--from clustering`` can redo the later stages on an existing
generalist, and a run killed at any moment finishes when the same command is run again: each
stage's ``done.json`` is written last, the engine resumes its checkpoints, and finished
specialists are files that a rerun skips.
"""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from specdistill.artifacts import read_json, write_json
from specdistill.cli import STAGE_ENTRY_POINTS, config_from_args, prepare_run_dir, setup_environment, stage_parser
from specdistill.config import STAGES, Config, stage_hash
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.provenance import is_done
from specdistill.report import print_summary, write_report
from specdistill.rundir import RunDir


class PeakMemory:
    """Peak resident memory of this process and its children while the block runs (sampled)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _rss(self) -> int:
        proc = psutil.Process()
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def reset_from(run_dir: Path, first: str) -> None:
    """Forget that ``first`` and every later stage finished, so they run again."""
    run = RunDir.at(run_dir)
    for stage in STAGES[STAGES.index(first):]:
        run.done(stage).unlink(missing_ok=True)


def run_pipeline(cfg: Config, start: str | None = None, force: bool = False,
                 stop: str | None = None) -> dict[str, Any]:
    run = prepare_run_dir(cfg, force)
    if force:   # start over: the report's pictures of the data are redrawn too
        start = STAGES[0]
        RunDir.at(run).data_samples.unlink(missing_ok=True)
    if start is not None:
        reset_from(run, start)
    timings_path = RunDir.at(run).timings
    timings = read_json(timings_path) if timings_path.exists() else {}
    results: dict[str, Any] = {}
    last = STAGES.index(stop) if stop else len(STAGES) - 1
    for stage in STAGES[: last + 1]:
        module_name, fn_name, _, _ = STAGE_ENTRY_POINTS[stage]
        fn = getattr(importlib.import_module(module_name), fn_name)
        print(f"\n== {stage} ==", flush=True)
        began = time.perf_counter()
        was_done = is_done(run, stage, stage_hash(cfg, stage), quiet=True)   # done for another config: it reruns
        with PeakMemory() as mem:
            results[stage] = fn(cfg, force=True) if force else fn(cfg)   # --force: every stage starts over
        if not was_done or stage not in timings:
            timings[stage] = {"seconds": round(time.perf_counter() - began, 1),
                              "peak_rss_mb": round(mem.peak / 2**20)}
            write_json(timings_path, timings)
    write_report(cfg, timings)
    print_summary(cfg, timings)
    return results


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    parser = stage_parser("Run the whole pipeline: generalist -> clustering -> specialists -> combine -> student.")
    parser.add_argument("config_path", nargs="?", help="experiment YAML (same as --config)")
    parser.add_argument("--from", dest="start", choices=STAGES, help="redo this stage and every later one")
    parser.add_argument("--until", dest="stop", choices=STAGES, help="stop after this stage")
    args = parser.parse_args(argv)
    if args.config_path and args.config:
        raise SpecdistillError("give the config once: either CONFIG or --config CONFIG")
    args.config = args.config or args.config_path
    run_pipeline(config_from_args(args), start=args.start, force=args.force, stop=args.stop)


if __name__ == "__main__":
    main()
