"""Ray plumbing for the specialist fan-out: which Ray to join, and what a task may ask of it.

Kept apart from the stage so the rules are easy to find: an explicit address wins, then the
cluster the process runs in (``RAY_ADDRESS`` under ``ray job submit``, the head node's own cluster
under ``ray submit``), else an embedded Ray sized to the machine; and resources are checked
against the nodes *before* anything is submitted, because Ray lets an infeasible task wait forever.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

import ray
import ray.exceptions as rex

from specdistill.config import Config
from specdistill.errors import SpecdistillError, handle_sigterm

INFEASIBLE_GRACE_S = 120.0    # how long tasks may wait with no node able to run them (a node lost)
CONNECT_TIMEOUT_S = 10.0      # how long to try reaching an explicit head address before giving up
NODE_CHECK_TIMEOUT_S = 90.0   # how long every node gets to answer the software check (a worker start + imports)
# a module of each project package a specialist task imports: a module, not the package, because a
# folder named like the package on sys.path (the checkout ~/specdistill when Ray adds the driver's
# working directory ~ to its workers' path) turns ``import specdistill`` into a namespace package
PROJECT_PACKAGES = ("specdistill.config", "specialists.train")


def _cluster_started_on_this_machine() -> bool:
    """True on a node of a cluster started with ``ray start`` (e.g. the head under ``ray submit``)."""
    try:
        from ray._private import services

        address = services.find_bootstrap_address(None)
        return address is not None and address in services.find_gcs_addresses()
    except Exception:  # noqa: BLE001 - private API; when in doubt, start an embedded Ray
        return False


def connect_ray(address: str | None = None) -> bool:
    """Join the right Ray; True when this call connected (and the caller should shut it down).

    An explicit address wins ('local' forces an embedded Ray); then ``RAY_ADDRESS`` (set inside
    ``ray job submit``) or a cluster started on this machine (the head node under ``ray submit``)
    via ``ray.init()``; otherwise an embedded Ray sized to this machine.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    target = address if address not in (None, "local", "auto") else os.environ.get("RAY_ADDRESS")
    if address != "local" and target:
        require_reachable(target)
    try:
        if address and address != "local":
            ray.init(address=address, **quiet)
        elif address is None and (os.environ.get("RAY_ADDRESS") or _cluster_started_on_this_machine()):
            ray.init(**quiet)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise SpecdistillError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')!r} "
                               f"({str(exc).splitlines()[0]}); check the address, or pass --address local "
                               "to train on this machine") from None
    handle_sigterm()   # take SIGTERM back from Ray's handler, which prints a C++ stack dump
    return True


def require_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to a ``host:port`` (or ``ray://``, ``http://``) address within ``timeout_s``,
    so an unreachable head is one line after seconds, not a minute of retries from Ray."""
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "ray", "http", "https") or not parsed.hostname or parsed.port is None:
        return   # 'auto', a bare host: let Ray resolve it
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise SpecdistillError(
            f"cannot reach the Ray head at {address} ({reason} after at most {timeout_s:g} s): check the address, "
            "that `ray start --head` runs there and that this machine may connect to its port, or pass "
            "--address local to train on this machine") from None


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
