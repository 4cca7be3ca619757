"""Ray plumbing for the specialist fan-out: which Ray to join, and what a task may ask of it.

Kept apart from the stage so the rules are easy to find: an explicit address wins, then the
cluster the process runs in (``RAY_ADDRESS`` under ``ray job submit``, the head node's own cluster
under ``ray submit``), else an embedded Ray sized to the machine (``specdistill.ray_connect``,
shared with data-parallel training); and resources are checked
against the nodes *before* anything is submitted, because Ray lets an infeasible task wait forever.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import ray
import ray.exceptions as rex

from specdistill.config import Config
from specdistill.errors import SpecdistillError
from specdistill.ray_connect import CONNECT_TIMEOUT_S, connect_ray, require_reachable  # noqa: F401 - re-exported

# which Ray to join is the whole project's rule (the training engine joins Ray too), so it lives in
# specdistill.ray_connect; the fan-out and its tests import it from here as before

INFEASIBLE_GRACE_S = 120.0    # how long tasks may wait with no node able to run them (a node lost)
NODE_CHECK_TIMEOUT_S = 90.0   # how long every node gets to answer the software check (a worker start + imports)
# the driver's own node cannot be unreachable: when it is late, its machine is busy (a worker start +
# torch imports took over 90 s beside other jobs on 2 cores), so it gets this much longer
OWN_NODE_GRACE_S = 600.0
# a module of each project package a specialist task imports: a module, not the package, because a
# folder named like the package on sys.path (the checkout ~/specdistill when Ray adds the driver's
# working directory ~ to its workers' path) turns ``import specdistill`` into a namespace package
PROJECT_PACKAGES = ("specdistill.config", "specialists.train")


def task_resources(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs per task; raises when no node of the cluster could ever run one."""
    scfg = cfg.specialists
    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0.0))
    if cfg.device == "cpu":
        if scfg.num_gpus_per_task > 0:
            raise SpecdistillError("device: cpu contradicts specialists.num_gpus_per_task > 0; drop one of them")
        num_gpus = 0.0
    elif scfg.num_gpus_per_task > 0:
        num_gpus = scfg.num_gpus_per_task
    else:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_gpus > 0 and gpus == 0:
        raise SpecdistillError(
            f"specialists.num_gpus_per_task={num_gpus:g} but the Ray cluster has no GPUs "
            f"({total.get('CPU', 0):g} CPUs); set specialists.num_gpus_per_task=0 to train on CPUs, "
            "or add GPU workers"
        )
    if cfg.device == "cuda" and num_gpus == 0:
        raise SpecdistillError("device: cuda but the Ray cluster has no GPUs; use device: auto or add GPU workers")
    need = {"CPU": scfg.num_cpus_per_task, "GPU": num_gpus}
    require_feasible(need)
    return {"num_cpus": scfg.num_cpus_per_task, "num_gpus": num_gpus}


def feasible(need: dict[str, float]) -> tuple[bool, str]:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    ok = any(all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0) for node in nodes)
    largest = ", ".join(f"{k} {max((n.get(k, 0.0) for n in nodes), default=0):g}" for k in need)
    return ok, largest


def require_feasible(need: dict[str, float]) -> None:
    ok, largest = feasible(need)
    if not ok:
        wanted = ", ".join(f"{k} {v:g}" for k, v in need.items() if v > 0)
        raise SpecdistillError(
            f"no node of the Ray cluster can run a specialist task (needs {wanted}; the largest node has "
            f"{largest}); lower specialists.num_cpus_per_task / num_gpus_per_task or add bigger nodes"
        )


def _driver_address() -> str | None:
    here = ray.get_runtime_context().get_node_id()
    return next((n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] == here), None)


def same_machine() -> bool:
    """Every live node runs on the driver's machine (embedded Ray, a simulated cluster), so the
    run directory is visible to every task."""
    address = _driver_address()
    return address is not None and all(n["NodeManagerAddress"] == address for n in ray.nodes() if n.get("Alive"))


# ----------------------------------------------------------------------------------------------
# Every node that may run a task runs the driver's software


def _make_software_report():
    """The probe, built inside a function so that cloudpickle ships it *by value*: a node that lacks
    the project can still run it and say so, instead of failing to unpickle the task."""

    def software_report(packages: tuple[str, ...]) -> dict[str, str]:
        import hashlib
        import importlib
        import platform
        import socket
        from pathlib import Path

        report = {"host": socket.gethostname(), "python": ".".join(platform.python_version_tuple()[:2])}
        for name in ("torch", "torchvision"):
            try:
                report[name] = str(importlib.import_module(name).__version__).split("+")[0]
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                report[name] = f"missing ({type(exc).__name__}: {exc})"
        digest = hashlib.sha256()
        for module in packages:
            try:
                root = Path(importlib.import_module(module).__file__).parent
            except Exception as exc:  # noqa: BLE001
                report["project"] = f"missing ({type(exc).__name__}: {exc})"
                return report
            for path in sorted(root.rglob("*.py")):
                digest.update(f"{module}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
        report["project"] = digest.hexdigest()[:12]
        return report

    return software_report


software_report = _make_software_report()


def _mismatch(driver: dict[str, str], node: dict[str, str], same_files: bool) -> str | None:
    """What differs between a node's software and the driver's, as the middle of one line. The
    project's code is compared only on other machines (``same_files`` False): on the driver's own
    machine the files are the driver's, and an edit during the run is not another checkout."""
    if node["torch"] != driver["torch"] or node["torchvision"] != driver["torchvision"]:
        return (f"runs torch {node['torch']} / torchvision {node['torchvision']} but the driver "
                f"{driver['torch']} / {driver['torchvision']}")
    if node["project"].startswith("missing"):
        return f"lacks the project ({node['project'][9:-1]})"
    if node["python"] != driver["python"]:
        return f"runs Python {node['python']} but the driver {driver['python']}"
    if not same_files and node["project"] != driver["project"]:
        return f"runs other project code than the driver (digest {node['project']} vs {driver['project']})"
    return None


def check_nodes(need: dict[str, float], timeout_s: float = NODE_CHECK_TIMEOUT_S) -> int:
    """Ask every live node that could run a task (``need``) what it runs, in parallel; raise one line
    for a node that does not answer within ``timeout_s`` (unreachable, or cannot start a worker) or
    runs other software than the driver. Returns the number of nodes checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver = software_report(PROJECT_PACKAGES)
    here = _driver_address()
    nodes = [n for n in ray.nodes() if n.get("Alive")
             and all(n["Resources"].get(k, 0.0) >= v for k, v in need.items() if v > 0)]
    probe = ray.remote(num_cpus=0, max_retries=0)(software_report)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                          name=f"software-check-{n['NodeManagerAddress']}").remote(PROJECT_PACKAGES): n
            for n in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    own = ray.get_runtime_context().get_node_id()
    if late and all(refs[ref]["NodeID"] == own for ref in late):
        print(f"specialists: this machine's Ray node has not started a worker within {timeout_s:g} s (a busy "
              f"machine?); waiting up to {OWN_NODE_GRACE_S:g} s more", flush=True)
        more, late = ray.wait(late, num_returns=len(late), timeout=OWN_NODE_GRACE_S)
        ready += more
    for ref in late:
        ray.cancel(ref, force=True)
    fix = "install the same on every node (scripts/node-setup.sh; `ray up` runs it again)"
    if late:
        node = refs[late[0]]
        raise SpecdistillError(
            f"node {node['NodeManagerAddress']} did not answer within {timeout_s:g} s: the head cannot reach it "
            "or it cannot start a Ray worker; check that its Ray ports are open to the head (`ray status` on the "
            "head lists it), or take it out of the cluster")
    for ref in ready:
        node = refs[ref]
        try:
            report = ray.get(ref)
        except rex.RayError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise SpecdistillError(f"node {node['NodeManagerAddress']} cannot run a Ray task ({first}); "
                                   f"{fix}") from None
        problem = _mismatch(driver, report, same_files=node["NodeManagerAddress"] == here)
        if problem:
            raise SpecdistillError(f"node {node['NodeManagerAddress']} ({report['host']}) {problem}; {fix}")
    return len(nodes)


# ----------------------------------------------------------------------------------------------
# The driver's connection to the cluster, watched while the specialists train

# how long the cluster's GCS may not answer before the driver gives up on it: well below Ray's own
# RAY_gcs_rpc_server_reconnect_timeout_s (60 s), after which Ray kills the driver with a fatal log line
LOST_AFTER_S = float(os.environ.get("SPECDISTILL_RAY_LOST_AFTER_S", "10"))
PROBE_INTERVAL_S = 2.0
STUCK_AFTER_LOST_S = 20.0   # a driver stuck in a Ray call this long after the loss is ended by the watch


def gcs_address(address: str | None = None) -> str | None:
    """What the driver's connection to its cluster depends on, as ``host:port``: the GCS this process
    is connected to (the head's ``ray start --port``), or under Ray Client (``ray://``, ``address`` or
    ``RAY_ADDRESS``) the client server, since the cluster's own addresses may not be reachable from here."""
    target = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS")
    if target and target.startswith("ray://"):   # ('local' is an embedded Ray: its GCS, below)
        return target.split("://", 1)[1].split("/", 1)[0]
    if not ray.is_initialized():   # (the runtime context would connect)
        return None
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no address to watch: the watch then trusts Ray
        return None


class ClusterWatch:
    """Says when the driver has lost its Ray cluster (the head died or restarted, the network dropped).

    Ray notices only after ``RAY_gcs_rpc_server_reconnect_timeout_s`` (60 s); until then calls that
    need the GCS (``ray.nodes()``) block, and then the core worker ends the process with a fatal C++
    log line and exit code 1. So a thread opens a TCP connection to the GCS port every
    ``interval_s``; when none succeeded for ``lost_after_s``, :attr:`lost` holds the cause, and the
    fan-out's loop (which polls it) raises :class:`SpecdistillError` with ``describe(cause)``, one
    line. Should the driver be stuck in a Ray call instead, the watch prints that line itself and
    ends the process (exit 2) ``stuck_after_s`` later, still before Ray's fatal exit.
    """

    def __init__(self, address: str | None, describe: Callable[[str], str] | None = None,
                 lost_after_s: float = LOST_AFTER_S, interval_s: float = PROBE_INTERVAL_S,
                 stuck_after_s: float = STUCK_AFTER_LOST_S) -> None:
        self.address = address
        self.describe = describe or (lambda cause: f"lost the connection to the Ray cluster at {address} ({cause})")
        self.lost_after_s, self.interval_s, self.stuck_after_s = lost_after_s, interval_s, stuck_after_s
        self.lost: str | None = None
        self._failing_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-connection-watch", daemon=True)

    def start(self) -> ClusterWatch:
        if self.address:
            self._thread.start()
        return self

    def __enter__(self) -> ClusterWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def skip_ray_teardown(code: int = 2) -> None:
        """After a lost cluster, end the process as soon as the error line is out (at exit, before Ray's
        handler): ``ray.shutdown()``, and the interpreter's own teardown of Ray's core worker, wait
        10-20 s on the GCS that is gone and may end in Ray's fatal log line. Only for a process that
        connected to Ray itself (the entry points): it ends the interpreter."""
        def exit_now() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

        atexit.register(exit_now)   # atexit runs last-registered first: before ray.shutdown

    def reachable(self) -> str | None:
        """One probe now: None when the GCS accepted a connection, else why not."""
        host, _, port = (self.address or "").rpartition(":")
        if not host or not port.isdigit():
            return None   # nothing to probe: trust Ray
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=self.interval_s).close()
            return None
        except OSError as exc:
            return "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)

    def check(self) -> None:
        """Raise the one line when the connection is lost (called by the driver's loop)."""
        if self.lost is not None:
            raise SpecdistillError(self.describe(self.lost))

    def _run(self) -> None:
        lost_at = 0.0
        while not self._stop.wait(self.interval_s if self._failing_since is None else 1.0):
            reason = self.reachable()
            now = time.monotonic()
            if reason is None:
                self._failing_since = None
                continue
            self._failing_since = self._failing_since or now
            silent = now - self._failing_since
            if silent >= self.lost_after_s and self.lost is None:
                self.lost = f"its GCS has not answered for {silent:.0f} s: {reason}"
                lost_at = now
            if self.lost is not None and now - lost_at >= self.stuck_after_s and not self._stop.is_set():
                # the main thread did not get out of Ray in time: say it here, before Ray's fatal exit
                sys.stderr.write(f"\nerror: {self.describe(self.lost)}\n")
                sys.stderr.flush()
                os._exit(2)
