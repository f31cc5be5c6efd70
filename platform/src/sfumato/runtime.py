"""Ray start-up shared by every stage: attach to a cluster when one is named, else start a
local Ray on demand. Workers of a cluster get this very copy of the sfumato package shipped
with the job (runtime_env py_modules), so the code a driver runs is the code its workers run."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(cfg) -> None:
    """`cfg` is the config's `ray` section."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        import sfumato

        log.info("attaching to Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"py_modules": [sfumato]}, log_to_driver=True)
    else:
        # address="local": never attach to a leftover cluster named in /tmp/ray.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
