"""The configs a sweep makes: a trial's proxy run, and the best trial as a full run.

The sweep config is a full run config plus a `tune:` section. The proxy is the full run with the
`tune.proxy` overrides applied (lower resolution, fewer steps, a smaller model, a data fraction);
a trial is the proxy with one sample of `tune.search_space` applied. The best trial goes back the
other way: the full run with the tuned values only, so every proxy-only key keeps the full run's
value, and the learning rate (and a per-step EMA decay) moved to the full run's effective batch.
Nothing here needs Ray: `check_sweep` runs when the config is loaded.
"""

from __future__ import annotations

import copy
import math
from typing import Any

# Setting one of these clears the other: the config takes exactly one of each pair.
EXCLUSIVE = {"train.ema.decay": "train.ema.halflife_samples", "train.ema.halflife_samples": "train.ema.decay"}
LR_KEY, EMA_DECAY_KEY = "train.optimizer.lr", "train.ema.decay"
# What the validation loss measures: a DDPM run's is the MSE of its prediction target (epsilon or
# v), a flow run's that of the velocity (sfumato.diffusion.loss.validation_loss). Trials that differ
# in these would be ranked on numbers that do not compare, so a sweep fixes them.
LOSS_DEFINING = ("diffusion.objective", "diffusion.prediction_type")


def run_tree(cfg) -> dict:
    """The config as a plain tree, without its `tune` and `pipeline` sections: what a run config
    holds."""
    from sfumato.config import to_dict

    tree = to_dict(cfg)
    tree.pop("tune", None)
    tree.pop("pipeline", None)
    return tree


def apply(tree: dict, values: dict[str, Any]) -> dict:
    """A copy of `tree` with dotted keys set."""
    from sfumato.config import apply_override

    tree = copy.deepcopy(tree)
    for key, value in values.items():
        if key in EXCLUSIVE:
            apply_override(tree, EXCLUSIVE[key], None)
        apply_override(tree, key, value)
    return tree


def validated(tree: dict, what: str, inputs: bool | None = None):
    """A Config from `tree`; a problem becomes a ValueError naming `what` and the dotted keys."""
    from pydantic import ValidationError

    from sfumato.config import _format_errors, validate_config

    try:
        return validate_config(tree, inputs)
    except ValidationError as err:
        raise ValueError(_format_errors(err, what)) from None


def proxy_tree(cfg) -> dict:
    return apply(run_tree(cfg), cfg.tune.proxy)


def trial_config(cfg, params: dict[str, Any], run_dir, name: str, inputs: bool | None = None):
    """One trial's proxy run, in its own run folder."""
    tree = apply(proxy_tree(cfg), {**params, "train.output_dir": str(run_dir), "name": name})
    return validated(tree, f"trial {name}", inputs)


def check_sweep(cfg) -> None:
    """At load: the proxy is a valid run with a validation loss, no key is both proxy-only and
    tuned, none changes what that loss measures (LOSS_DEFINING), ASHA's first rung falls inside
    the proxy, and every bound or choice of the search space makes a valid proxy run."""
    tune = cfg.tune
    if cfg.train is None:
        raise ValueError("tune: the config needs a `train` section, the full run that the proxy scales down")
    for section, keys in (("search_space", tune.search_space), ("proxy", tune.proxy)):
        for key in keys:
            defining = [k for k in LOSS_DEFINING if key == k or k.startswith(key + ".")]
            if defining:
                raise ValueError(
                    f"tune.{section}.{key} changes what the validation loss measures ({defining[0]}: a DDPM run's is "
                    "the MSE of its prediction target, a flow run's that of the velocity), so trials could not be "
                    f"ranked on it; set {defining[0]} in the run and sweep each choice on its own, then compare the "
                    "best runs with `sfumato evaluate`")
    for key in tune.search_space:
        clash = [p for p in tune.proxy if key == p or key.startswith(p + ".") or p.startswith(key + ".")]
        if clash:
            raise ValueError(f"tune.search_space.{key} is also set by tune.proxy.{clash[0]}: a tuned key must "
                             "carry over to the full run, a proxy key never does")
    proxy = validated(proxy_tree(cfg), "tune.proxy applied to the full run")
    if proxy.train.validation is None:
        raise ValueError("tune: the proxy has no train.validation; trials are compared on their validation loss, "
                         "so set train.validation in the run or in tune.proxy")
    total = proxy.train.total_steps
    if tune.scheduler.kind == "asha" and tune.scheduler.grace_period_steps >= total:
        raise ValueError(f"tune.scheduler.grace_period_steps={tune.scheduler.grace_period_steps} is not below the "
                         f"proxy's {total} steps: ASHA could stop nothing")
    if proxy.train.validation.every_steps > tune.scheduler.grace_period_steps and tune.scheduler.kind == "asha":
        raise ValueError(f"train.validation.every_steps={proxy.train.validation.every_steps} (in the proxy) is above "
                         f"tune.scheduler.grace_period_steps={tune.scheduler.grace_period_steps}: ASHA's first rung "
                         "would see no validation loss")
    base = proxy_tree(cfg)
    for key, distribution in tune.search_space.items():
        for value in distribution.extremes():
            validated(apply(base, {key: value}), f"tune.search_space.{key} = {value!r} in the proxy")


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
    how = {"effective_batch_proxy": batch_proxy, "effective_batch_full": batch_full, "lr_scaling": rule,
           "proxy_values": params, "full_values": values}
    return values, how


def best_run_config(cfg, params: dict[str, Any], trial_cfg):
    """The full run config with the best trial's values (scaled), validated, and the scaling."""
    values, how = scale_to_full_run(cfg, params, trial_cfg)
    return validated(apply(run_tree(cfg), values), "the best config"), how
