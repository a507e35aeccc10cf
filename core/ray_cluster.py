"""The Ray connection shared by `milroi-serve score --ray` and `milroi-train features --ray`.

`RayOptions` is what the `--ray*` flags ask for (`core.cli.add_ray_arguments`); `connect` joins
or starts the cluster, failing fast with one clear error on an address nobody listens on;
`default_actor_count` sizes the actor pool to the cluster. Ray itself is imported only here and
only when a command asks for it.
"""
from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass

from core.errors import ClusterError, ConfigError

DEFAULT_MAX_RESTARTS = 2   # restarts of a dead actor, each re-running its slide
DEFAULT_ACTOR_CPUS = 1
DEFAULT_ACTOR_GPUS = 0


@dataclass(frozen=True)
class RayOptions:
    """Where the actors run and what each one takes."""

    address: str                   # auto | local | HOST:6379 | ray://HOST:10001
    actors: int | None = None      # default: as many as the cluster fits
    num_cpus: float = DEFAULT_ACTOR_CPUS
    num_gpus: float = DEFAULT_ACTOR_GPUS
    max_restarts: int = DEFAULT_MAX_RESTARTS

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"--ray-max-restarts must be >= 0, got {self.max_restarts}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors must be at least 1, got {self.actors}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RayOptions | None:
        """The options of the `--ray*` flags, or None when `--ray` was not given."""
        if getattr(args, "ray", None) is None:
            return None
        return cls(args.ray, args.ray_actors, args.ray_num_cpus, args.ray_num_gpus,
                   args.ray_max_restarts)


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address` ("auto": the one this node belongs to, `ray://host:10001`,
    `host:6379`) or start a local one ("local"); returns True when this call started the
    connection (the caller then shuts it down). An already initialised Ray is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    if address not in ("auto", "local"):
        check_reachable(address)
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    return True


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an address nobody listens on: ray.init would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--ray {address!r}: give auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None


def default_actor_count(num_cpus: float, num_gpus: float) -> int:
    """As many actors as the cluster can hold at once: one per `num_gpus` GPUs when actors take
    GPUs, else one per `num_cpus` CPUs."""
    import ray

    resources = ray.cluster_resources()
    if num_gpus > 0:
        count = int(resources.get("GPU", 0) // num_gpus)
        if count < 1:
            raise ClusterError(f"the Ray cluster has no GPU for actors of {num_gpus} GPU(s) "
                               f"(resources: {resources})")
        return count
    return max(1, int(resources.get("CPU", 1) // num_cpus))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (Ray's carry a whole remote traceback)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
