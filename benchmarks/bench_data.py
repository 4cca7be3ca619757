"""How long each data source takes to build (first use) against loading it from the cache.

    python benchmarks/bench_data.py [--sources glyphs-latin glyphs-hanzi ...]

Each source is built into a fresh temporary cache (wall and CPU seconds, images per second), then
loaded again from that cache; the ratio build/load says what the cache saves. ``synthetic`` is
generated on every load (it is faster to make than to read), so it has one row. The machine is
shared: wall time includes waiting for the CPU, CPU time does not.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdistill.config import DataConfig  # noqa: E402
from specdistill.data import load_data  # noqa: E402

CASES = {
    "glyphs-latin": dict(source="glyphs-latin", image_size=32, copies_per_font=8),
    "glyphs-hanzi": dict(source="glyphs-hanzi", num_classes=1000, image_size=32, copies_per_font=6),
    "fashion-mnist": dict(source="fashion-mnist", image_size=28),
    "synthetic": dict(source="synthetic", num_classes=20000, group_size=20, examples_per_class=8,
                      image_size=16),
}


def timed(cfg: DataConfig):
    wall, cpu = time.perf_counter(), time.process_time()
    dataset = load_data(cfg)
    return dataset, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print(f"# bench_data  {datetime.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'source':14s} {'classes':>7s} {'images':>8s} {'build s':>8s} {'cpu s':>6s} {'img/s':>8s} "
          f"{'load s':>7s} {'build/load':>10s}")
    with tempfile.TemporaryDirectory() as cache:
        for name in args.sources:
            cfg = DataConfig(cache_dir=cache, **CASES[name])
            dataset, build, cpu = timed(cfg)
            images = sum(len(dataset.split(s)) for s in ("train", "val", "test"))
            if name == "synthetic":
                load_text, ratio = "-", "-"
            else:
                _, load, _ = timed(cfg)
                load_text, ratio = f"{load:7.3f}", f"{build / load:9.0f}x"
            print(f"{name:14s} {dataset.num_classes:7d} {images:8d} {build:8.1f} {cpu:6.1f} "
                  f"{images / build:8.0f} {load_text:>7s} {ratio:>10s}", flush=True)


if __name__ == "__main__":
    main()
