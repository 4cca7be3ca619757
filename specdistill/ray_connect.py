"""Which Ray to join: the one rule every Ray user of the project follows (the specialist fan-out,
data-parallel training of the generalist and the student).

An explicit address wins, then the cluster the process runs in (``RAY_ADDRESS`` under
``ray job submit``, the head node's own cluster under ``ray submit``), else an embedded Ray sized
to the machine. It lives in ``specdistill`` rather than beside the fan-out because the training
engine, which every stage shares, joins Ray too (``specdistill.distributed``).
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

import ray

from specdistill.errors import SpecdistillError, handle_sigterm

CONNECT_TIMEOUT_S = 10.0      # how long to try reaching an explicit head address before giving up


def _cluster_started_on_this_machine() -> bool:
    """True on a node of a cluster started with ``ray start`` (e.g. the head under ``ray submit``)."""
    try:
        from ray._private import services

        address = services.find_bootstrap_address(None)
        return address is not None and address in services.find_gcs_addresses()
    except Exception:  # noqa: BLE001 - private API; when in doubt, start an embedded Ray
        return False


def connect_ray(address: str | None = None, dashboard: bool = False) -> bool:
    """Join the right Ray; True when this call connected (and the caller should shut it down).

    An explicit address wins ('local' forces an embedded Ray); then ``RAY_ADDRESS`` (set inside
    ``ray job submit``) or a cluster started on this machine (the head node under ``ray submit``)
    via ``ray.init()``; otherwise an embedded Ray sized to this machine, with its dashboard only when
    ``dashboard`` (Ray Train needs the state API it serves; the specialists start faster without).
    """
    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS") == "local":   # Ray's own word for "start one here"
        address = "local"
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
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard, **quiet)
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
