"""Ray plumbing for the specialist fan-out: which Ray to join, and what a task may ask of it.

Kept apart from the stage so the rules are easy to find: an explicit address wins, then the
cluster the process runs in (``RAY_ADDRESS`` under ``ray job submit``, the head node's own cluster
under ``ray submit``), else an embedded Ray sized to the machine; and resources are checked
against the nodes *before* anything is submitted, because Ray lets an infeasible task wait forever.
"""

from __future__ import annotations

import logging
import os

import ray

from specdistill.config import Config
from specdistill.errors import SpecdistillError

INFEASIBLE_GRACE_S = 120.0    # how long tasks may wait with no node able to run them (a node lost)


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
    return True


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


def same_machine() -> bool:
    """Every live node runs on the driver's machine (embedded Ray, a simulated cluster), so the
    run directory is visible to every task."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    address = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == here), None)
    return address is not None and all(n["NodeManagerAddress"] == address for n in nodes)
