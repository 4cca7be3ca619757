"""The quickstart's specialists on a `ray up` cluster against the embedded Ray, same machine (issue 14).

    python benchmarks/bench_cluster.py          # root: runs scripts/cluster-smoke.sh --bench

The cluster side is what a user runs: `ray submit cluster.yaml train_specialists.py -- ...` against
a head brought up by `ray up` (Ray's local provider, SSH to 127.0.0.1, the project rsynced and set
up in a venv), timed from the `ray submit` command to its return; the embedded side is
`python train_specialists.py --address local --force` on the same run directory right after `ray
down`. Both train the quickstart's 12 specialists as configured (the generalist before them is cut
to 20 steps: it changes no specialist's cost). The ratio is the overhead of the cluster path (SSH,
rsync of the script, joining a running cluster instead of starting one, the software check).
Prints one markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not Path("/usr/sbin/sshd").exists():
        print("bench_cluster: skipped (needs root, unshare and openssh-server: see scripts/cluster-smoke.sh)")
        return
    out = subprocess.run(["bash", "scripts/cluster-smoke.sh", "--bench"], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False).stdout
    match = re.search(r"bench: ray submit on the ray-up cluster ([\d.]+) s, embedded Ray ([\d.]+) s, ratio ([\d.]+)x",
                      out)
    if not match:
        print(out[-4000:])
        sys.exit("bench_cluster: the smoke run failed (output above)")
    cluster, embedded, ratio = match.groups()
    machine = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    print("| date | machine | ray submit (ray-up cluster) | embedded Ray | ratio |")
    print("|---|---|---:|---:|---:|")
    print(f"| {datetime.date.today()} | {machine} | {cluster} s | {embedded} s | {ratio}x |")


if __name__ == "__main__":
    main()
