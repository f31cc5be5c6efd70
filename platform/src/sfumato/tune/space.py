"""The configs a sweep makes: a trial's proxy run, and the best trial as a full run.

The sweep config is a full run config plus a `tune:` section. The proxy is the full run with the
`tune.proxy` overrides applied (lower resolution, fewer steps, a smaller model, a data fraction);
a trial is the proxy with one sample of `tune.search_space` applied. The best trial goes back the
other way: the full run with the tuned values only, so every proxy-only key keeps the full run's
value, and the learning rate (and a per-step EMA decay) moved to the full run's effective batch.
Nothing here needs Ray. What the config checks when it is loaded (the proxy, the search space's
bounds: `check_sweep`) and the tree operations both sides use live in sfumato.config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sfumato.config import EMA_DECAY_KEY, LR_KEY, apply, proxy_tree, run_tree, validated
from sfumato.layout import TuneFolder
from sfumato.records import VAL_LOSS

METRIC, MODE = VAL_LOSS, "min"  # what trials are ranked on (validation loss, EMA weights)


def trial_dir(cfg, trial_id: str) -> Path:
    """A trial's run folder: tune.output_dir/trials/<trial id>/."""
    return TuneFolder(cfg.tune.output_dir).trial(trial_id).root


def trial_config(cfg, params: dict[str, Any], run_dir, name: str, inputs: bool | None = None):
    """One trial's proxy run, in its own run folder."""
    tree = apply(proxy_tree(cfg), {**params, "train.output_dir": str(run_dir), "name": name})
    return validated(tree, f"trial {name}", inputs)


def scale_to_full_run(cfg, params: dict[str, Any], trial_cfg) -> tuple[dict, dict]:
    """The best trial's values for the full run, and how they were moved there.

    The learning rate follows `tune.lr_scaling` from the trial's effective batch B_p to the full
    run's B_f (computed with the tuned values, e.g. a tuned grad_accum_steps); a tuned per-step
    EMA decay keeps its half-life in images, decay^(B_f / B_p). Everything else (weight decay,
    Min-SNR gamma, warmup steps, an EMA half-life in images, a flow run's time distribution and
    shift) carries over unchanged: a flow shift tuned on a lower-resolution proxy transfers as
    tuned only with diffusion.flow.shift_base_px set (the shift is then per pixel of resolution).
    """
    full = validated(apply(run_tree(cfg), params), "the best trial's values in the full run")
    batch_proxy, batch_full = trial_cfg.train.mean_effective_batch, full.train.mean_effective_batch
    ratio = batch_full / batch_proxy
    values = dict(params)
    rule = cfg.tune.lr_scaling
    if LR_KEY in values:
        values[LR_KEY] = float(values[LR_KEY]) * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
    if EMA_DECAY_KEY in values:
        values[EMA_DECAY_KEY] = float(values[EMA_DECAY_KEY]) ** ratio
    how = {
        "effective_batch_proxy": batch_proxy,
        "effective_batch_full": batch_full,
        "lr_scaling": rule,
        "proxy_values": params,
        "full_values": values,
    }
    return values, how


def best_run_config(cfg, params: dict[str, Any], trial_cfg):
    """The full run config with the best trial's values (scaled), validated, and the scaling."""
    values, how = scale_to_full_run(cfg, params, trial_cfg)
    return validated(apply(run_tree(cfg), values), "the best config"), how
