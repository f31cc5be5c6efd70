"""`sfumato tune`: a Ray Tune sweep whose every trial is the real trainer on a proxy run.

Each trial is a function that builds its proxy config and starts a TorchTrainer (the Train V2
way: a Tune trial launches a trainer; passing a trainer into a Tuner is deprecated). Its
validation losses reach Tune through `TuneReportCallback`; ASHA compares trials on them at
fixed optimizer steps and stops the laggards; Optuna's TPE picks the next configs. A trial's run
folder is `tune.output_dir/trials/<trial id>/`, a normal run folder, so a trial restarted after a
crash resumes from its own checkpoint, and a finished one is never trained again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sfumato.config import Config, ConfigError, dump_yaml, to_dict, validate_config, write_resolved
from sfumato.layout import DataFolder, RunFolder, TuneFolder, atomic_write_json
from sfumato.tune.space import METRIC, MODE, trial_dir

log = logging.getLogger(__name__)

TRIAL_PROCESS_MEMORY = 512 * 2**20  # bytes Ray reserves for a trial's own process (not its workers)


def run_trial(params: dict, sweep: dict) -> None:
    """One Tune trial: the proxy run with `params`, trained by a TorchTrainer in its own folder."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sfumato import checkpoint as ckpt
    from sfumato.layout import read_metrics
    from sfumato.train.loop import finish_run, make_trainer, prepare_run
    from sfumato.train.spike import LossSpikeError
    from sfumato.train.step import NonFiniteError
    from sfumato.tune.space import trial_config

    cfg = validate_config(sweep, inputs=False)  # trials read shards, not the sources
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = trial_dir(cfg, trial_id)
    trial = trial_config(cfg, params, run_dir, f"{cfg.name}-{trial_id}", inputs=False)
    latest = ckpt.latest(RunFolder(run_dir).checkpoints)
    if latest is not None and ckpt.load_meta(latest)["step"] >= trial.train.total_steps:
        # Finished before the sweep was killed: replay its validation losses, train nothing.
        for record in read_metrics(RunFolder(run_dir).metrics):
            if METRIC in record:
                ray.tune.report(record)
        return
    prepare_run(trial)
    atomic_write_json(TuneFolder.params(RunFolder(run_dir)), params)
    make_trainer(trial, callbacks=[TuneReportCallback()]).fit()
    try:
        finish_run(trial)
    except (NonFiniteError, LossSpikeError) as err:
        # A diverging config (NaN/Inf, or a loss spike past train.spike_guard) is a result (the
        # table says "diverged"), not a failure to retry: a retry would replay it.
        log.warning("trial %s: %s", trial_id, err)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _searcher(cfg: Config):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.tune.search
    if s.algorithm == "tpe":
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.random_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    return OptunaSearch(sampler=sampler, metric=METRIC, mode=MODE)


def _scheduler(cfg: Config, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.tune.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # time_attr "step": rungs are optimizer steps, the same for every trial whatever its
    # effective batch or its number of reports.
    return ASHAScheduler(
        time_attr="step",
        metric=METRIC,
        mode=MODE,
        max_t=max_steps,
        grace_period=s.grace_period_steps,
        reduction_factor=s.reduction_factor,
    )


def param_space(cfg: Config) -> dict:
    from ray import tune

    space = {}
    for key, d in cfg.tune.search_space.items():
        if d.distribution == "log_uniform":
            space[key] = tune.loguniform(d.low, d.high)
        elif d.distribution == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        else:
            space[key] = tune.choice(d.values)
    return space


def _check_resume(cfg: Config, out: Path, resume: bool) -> None:
    """A new sweep never overwrites one; a resumed sweep must be the same sweep."""
    from ray.tune import Tuner

    experiment = TuneFolder(out).experiment
    if not resume:
        if experiment.exists():
            raise ConfigError(
                f"{out} already holds a sweep: pass --resume to continue it, or set another tune.output_dir"
            )
        return
    if not Tuner.can_restore(experiment):
        raise ConfigError(f"{out} holds no sweep to resume (no Tune experiment in {experiment})")
    saved = TuneFolder(out).sweep_config.read_text()
    if saved != dump_yaml(cfg):
        raise ConfigError(
            f"the config differs from the one the sweep in {out} was started with "
            f"({TuneFolder(out).sweep_config}); resume with that config, or start a new sweep elsewhere"
        )


def _check_shards(proxy: Config) -> None:
    from sfumato.data.loader import shard_paths

    for stage in proxy.train.stages:
        shard_paths(DataFolder(proxy.data.output_dir).shards, stage.resolution_px)


def _check_state_api() -> None:
    """Ray Train frees the workers of a trial that ASHA stops through Ray's state API; without it
    they stay reserved and the sweep waits forever for resources, so fail now instead."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        list_nodes(limit=1, timeout=30)
    except (RayStateApiException, ConnectionError) as err:
        raise ConfigError(
            "Ray's state API (the dashboard) is not reachable, and early stopping needs it to free "
            f"a stopped trial's workers: start Ray with its dashboard ({err})"
        ) from None


def run_sweep(cfg: Config, resume: bool = False) -> dict:
    """Run (or resume) the sweep of cfg.tune; write the results, the curves and the best config."""
    from ray import tune

    from sfumato.runtime import init_ray
    from sfumato.tune.results import write_results
    from sfumato.tune.space import proxy_tree, validated

    if cfg.tune is None:
        raise ConfigError("the config has no `tune` section")
    out = cfg.tune.output_dir
    _check_resume(cfg, out, resume)
    proxy = validated(proxy_tree(cfg), "tune.proxy")
    _check_shards(proxy)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, TuneFolder(out).sweep_config)
    init_ray(cfg.ray, dashboard=True)
    if cfg.tune.scheduler.kind == "asha":
        _check_state_api()
    s = cfg.tune.search
    # The trial process only waits on its trainer, so it reserves memory but no CPU (Tune refuses
    # an empty request): a trial costs exactly its training workers (proxy train.num_workers x
    # train.cpus_per_worker, plus GPUs), and max_concurrent_trials of them fit the cluster.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=to_dict(cfg)), {"CPU": 0, "memory": TRIAL_PROCESS_MEMORY}
    )
    if resume:
        tuner = tune.Tuner.restore(
            str(TuneFolder(out).experiment), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                search_alg=_searcher(cfg),
                scheduler=_scheduler(cfg, proxy.train.total_steps),
                num_samples=s.num_trials,
                max_concurrent_trials=s.max_concurrent_trials,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=TuneFolder(out).experiment.name,
                storage_path=str(out),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
            ),
        )
    grid = tuner.fit()
    return write_results(cfg, proxy, grid)
