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
