"""Ray start-up shared by every stage: attach to a cluster when one is named, else start a
local Ray on demand. Workers of a cluster get this very copy of the sfumato package shipped
with the job (runtime_env py_modules), so the code a driver runs is the code its workers run."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(cfg, dashboard: bool = False) -> None:
    """`cfg` is the config's `ray` section. `dashboard`: a local Ray also runs the dashboard, whose
    state API Ray Train's placement-group cleaner needs to free the workers of a trainer whose
    controller was killed (a Tune trial stopped early); clusters always have it."""
    from sfumato.console import quiet_ray_data, quiet_ray_workers, ray_env_vars

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        import sfumato

        log.info("attaching to Ray cluster at %s", address)
        # The package's folder, not the module object: under `ray job submit` Ray merges this with
        # the job's runtime_env (its working_dir) by deep copy, which a module cannot survive.
        package = os.path.dirname(os.path.abspath(sfumato.__file__))
        ray.init(address=address, runtime_env={"py_modules": [package], "env_vars": ray_env_vars()}, log_to_driver=True)
    elif dashboard:
        # Ray's state API, called from inside the cluster (the cleaner), guesses which local Ray
        # to ask and gives up when a machine runs two; a port chosen here lets every process of
        # this Ray be told its dashboard's address.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # this driver's calls too
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=True,
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **ray_env_vars()}},
            log_to_driver=True,
        )
    else:
        # address="local": never attach to a leftover cluster named in /tmp/ray.
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": ray_env_vars()},
            log_to_driver=True,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    quiet_ray_data()
    quiet_ray_workers()  # Ray Train's PreemptionWatcher notice, DeepSpeed's shm op line: console.py says why


def cpu_tasks(cap: int | None):
    """Ray Data's compute strategy for the CPU stages' tasks (ingest, shards): at most `cap` at
    once, or, with no cap, as many as the cluster has free CPUs (each task takes one), the rest
    submitted ahead and queued at Ray's scheduler, which starts one the moment a CPU frees. A cap
    is enforced by Ray Data itself, which submits the next task only after it has seen one finish:
    every process then waits 0.1-0.2 s between tasks (a task trace: BENCHMARKS.md, ingest)."""
    return ray.data.TaskPoolStrategy(size=cap)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
