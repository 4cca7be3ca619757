"""Failures a cluster user meets, each one line and no hang (issue 14), without `ray up`:

* the head address cannot be reached: one line within seconds;
* a node runs other software than the driver (the project missing, another torch): one line naming
  the node, before any specialist task is submitted (a simulated cluster whose extra node's worker
  processes see a doctored ``PYTHONPATH``);
* the driver loses the cluster mid-run: it exits with one line, and a rerun finishes the missing
  specialists and keeps the finished ones.

The real `ray up` / `ray submit` / `ray job submit` path is scripts/cluster-smoke.sh (`make cluster-test`).
"""

from __future__ import annotations

import socket
import time

import pytest

from specdistill.errors import SpecdistillError


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "http://127.0.0.1:{port}"])
def test_an_unreachable_head_is_one_line_within_seconds(address, monkeypatch):
    from specialists.ray_cluster import connect_ray

    address = address.format(port=_closed_port())
    began = time.monotonic()
    with pytest.raises(SpecdistillError, match=r"cannot reach the Ray head at .*--address local"):
        connect_ray(address)
    # and the same through RAY_ADDRESS, as `ray job submit` sets it
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(SpecdistillError, match="cannot reach the Ray head"):
        connect_ray(None)
    assert time.monotonic() - began < 30


def _fake_package(root, name, body):
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return root


@pytest.fixture(scope="module")
def doctored_cluster(tmp_path_factory):
    """A head that cannot run a task (0 CPUs) and three 1-CPU nodes: one like the driver, one whose
    Ray workers import another torch, one whose workers cannot import the project."""
    import os

    import ray
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("nodes")
    old_torch = _fake_package(root / "old-torch", "torch", '__version__ = "2.0.0+cpu"\n')
    no_project = _fake_package(root / "no-project", "specialists",
                               'raise ModuleNotFoundError("No module named \'specialists\'")\n')
    small = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": small,
                                                            "include_dashboard": False})
    nodes = {"good": cluster.add_node(num_cpus=1, resources={"good": 1}, object_store_memory=small)}
    saved = os.environ.get("PYTHONPATH")
    try:   # a raylet and its workers inherit the environment they were started with
        for name, path in (("old-torch", old_torch), ("no-project", no_project)):
            os.environ["PYTHONPATH"] = str(path)
            nodes[name] = cluster.add_node(num_cpus=1, resources={name: 1}, object_store_memory=small)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    cluster.wait_for_nodes()
    # Ray puts the driver's working directory first on its workers' sys.path: start the driver
    # outside the checkout, as `ray submit` does (from the head's home), so the doctored nodes count
    here = os.getcwd()
    os.chdir(root)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
    finally:
        os.chdir(here)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_a_node_like_the_driver_passes_the_check(doctored_cluster):
    from specialists.ray_cluster import check_nodes

    assert check_nodes({"CPU": 1, "good": 1}) == 1
    assert check_nodes({"CPU": 0, "no-such-resource": 1}) == 0


@pytest.mark.parametrize("node, message", [
    ("old-torch", r"node \S+ \(.*\) runs torch 2\.0\.0 / torchvision .* but the driver 2\.\d+\.\d+ / .*"
                  r"scripts/node-setup\.sh"),
    ("no-project", r"node \S+ \(.*\) lacks the project \(ModuleNotFoundError: No module named "
                   r"'specialists'\).*scripts/node-setup\.sh"),
])
def test_a_node_with_other_software_is_one_line_before_any_task(doctored_cluster, node, message):
    from specialists.ray_cluster import check_nodes

    began = time.monotonic()
    with pytest.raises(SpecdistillError, match=message) as err:
        check_nodes({"CPU": 1, node: 1})
    assert "\n" not in str(err.value)
    assert time.monotonic() - began < 60


def test_a_node_that_never_answers_is_one_line_after_the_timeout(doctored_cluster):
    """A node whose worker cannot start in time looks to the driver like one it cannot reach."""
    from specialists.ray_cluster import check_nodes

    with pytest.raises(SpecdistillError, match=r"did not answer within 0\.001 s: the head cannot reach it"):
        check_nodes({"CPU": 1, "good": 1}, timeout_s=0.001)


# ----------------------------------------------------------------------------------------------
# The driver loses its cluster mid-run: one line within seconds, and a rerun finishes the rest

LOST_CONFIG = """\
name: lost-cluster
device: cpu
seed: 0
data: {source: synthetic, num_classes: 12, group_size: 3, examples_per_class: 40, image_size: 8, augment: false}
generalist:
  model: {name: mlp, hidden: [32]}
specialists:
  train: {epochs: 40, batch_size: 16, lr: 0.05}
  num_cpus_per_task: 1
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _generalist_and_groups(run_dir, config_path) -> None:
    """The run directory as stages 1-2 leave it for the specialists: a small generalist, the planted groups."""
    from specdistill.config import load_config
    from testkit.runs import write_generalist_and_groups

    write_generalist_and_groups(load_config(config_path), run_dir, epochs=2)


def _start_head(temp_dir, env):
    """`ray start --head --block` as a process group this test owns, every port of it chosen free
    (other Ray clusters may run on this machine); returns (process, GCS address) once it runs."""
    import subprocess

    port = _free_port()
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in (temp_dir / "head.log").read_text():
        assert head.poll() is None, (temp_dir / "head.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the Ray head did not start within 180 s"
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


def _kill_group(proc) -> None:
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _finished(spec_dir):
    """Each finished specialist's files: name -> (bytes, mtime)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for stem in sorted(q.stem for q in spec_dir.glob("[0-9]*.json"))
            for p in (spec_dir / f"{stem}.json", spec_dir / f"{stem}.safetensors")}


def test_a_driver_that_loses_its_cluster_says_so_in_one_line_and_a_rerun_trains_only_the_rest(tmp_path):
    """The head (GCS, raylet, workers) dies while the specialists train, as when the head node is
    lost or restarted: the driver ends within seconds, well before Ray's own 60 s, with one line
    naming the cluster and the fix; what finished stays, and the same command (against an embedded
    Ray here) trains exactly the missing specialists."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    config = tmp_path / "lost.yaml"
    config.write_text(LOST_CONFIG)
    run = tmp_path / "run"
    spec_dir = run / "specialists"
    _generalist_and_groups(run, config)
    # this Ray turns token authentication on by default for a head started here, and a driver given an
    # explicit address does not pick the token up: run this private cluster without it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    temp_dir = Path(tempfile.mkdtemp(prefix="sd-ray-", dir="/tmp"))   # short: Ray's socket paths must fit
    command = [sys.executable, "-m", "specialists.fanout", "--config", str(config), "--run-dir", str(run)]
    head = driver = rerun = None
    try:
        head, address = _start_head(temp_dir, env)
        err_path = tmp_path / "driver.err"
        with open(tmp_path / "driver.out", "w") as out, open(err_path, "w") as err:   # files: no pipe fills up
            driver = subprocess.Popen([*command, "--address", address], stdout=out, stderr=err, env=env,
                                      start_new_session=True)
        deadline = time.monotonic() + 180
        while not list(spec_dir.glob("[0-9]*.json")):
            assert driver.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no specialist finished within 180 s"
            time.sleep(0.1)
        at_kill = _finished(spec_dir)
        _kill_group(head)                       # GCS, raylet and the workers training specialists
        killed = time.monotonic()
        try:
            driver.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver still runs 90 s after its cluster died: {err_path.read_text()[-2000:]}")
        took = time.monotonic() - killed
        err = err_path.read_text()

        # one line, within the watch's 10 s and well before Ray's own 60 s; no traceback, no fatal log last
        assert driver.returncode == 2, err[-3000:]
        assert took < 45, f"the driver took {took:.0f} s to notice; {err[-2000:]}"
        last = err.strip().splitlines()[-1]
        print(f"the driver ended {took:.1f} s after its head died: {last}")
        assert last.startswith("error: lost the connection to the Ray cluster at ") and address.split(":")[1] in last
        assert "rerun the same command" in last and str(spec_dir) in last, last
        assert "Traceback" not in err and "Failed to connect to GCS" not in err, err[-3000:]
        finished = _finished(spec_dir)
        assert len(finished) // 2 < 4, "every specialist finished before the head died: nothing was cut"
        assert f"while {4 - len(finished) // 2} of 4 specialists" in last, last
        assert f"the {len(finished) // 2} finished are saved" in last, last
        for name, (data, stamp) in at_kill.items():       # what was finished stays as it was
            assert finished[name] == (data, stamp), f"{name} changed"
        assert not (spec_dir / "done.json").exists()

        # the same command, now on an embedded Ray, trains exactly the missing ones
        rerun = subprocess.Popen([*command, "--address", "local"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env, start_new_session=True)
        out, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out[-3000:]
        missing = 4 - len(finished) // 2
        assert f"specialists: {missing} to train, {4 - missing} already finished" in out, out[-3000:]
        assert f"specialists: {missing} trained, {4 - missing} reused, 4 in all" in out, out[-3000:]
        assert sorted(p.name for p in spec_dir.glob("[0-9]*.json")) == [f"{m:04d}.json" for m in range(4)]
        after = _finished(spec_dir)
        for name, (data, stamp) in finished.items():
            assert after[name] == (data, stamp), f"{name} was trained again"
        assert (spec_dir / "done.json").exists()
    finally:
        for proc in (driver, rerun, head):
            if proc is not None:
                _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_watch_says_lost_after_its_grace_and_ends_a_driver_stuck_in_ray(tmp_path):
    """Without a cluster: a GCS address nobody listens on is lost after ``lost_after_s`` (the loop's
    check raises the one line); a driver that never gets back to its loop (stuck in a Ray call) is
    ended by the watch itself, with the same line last and exit code 2."""
    import subprocess
    import sys

    from specialists.ray_cluster import ClusterWatch

    address = f"127.0.0.1:{_closed_port()}"
    with ClusterWatch(address, describe=lambda cause: f"lost {address} ({cause}); rerun",
                      lost_after_s=0.5, interval_s=0.1, stuck_after_s=60) as watch:
        watch.check()                                   # not yet: within the grace
        deadline = time.monotonic() + 20
        while watch.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(SpecdistillError, match=rf"lost {address} \(its GCS has not answered for \d+ s: "
                                                   r"Connection refused\); rerun"):
            watch.check()
    live = ClusterWatch(None)                           # no address (Ray Client without one): nothing to probe
    assert live.reachable() is None and live.start().lost is None

    stuck = ("import time\nfrom specialists.ray_cluster import ClusterWatch\n"
             f"ClusterWatch({address!r}, describe=lambda c: 'lost it; rerun the same command', lost_after_s=0.3, "
             "interval_s=0.1, stuck_after_s=0.5).start()\nprint('training', flush=True)\ntime.sleep(120)\n")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and time.monotonic() - began < 60, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: lost it; rerun the same command"
