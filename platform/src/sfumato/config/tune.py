"""The `tune` section (`sfumato tune`: a proxy of the run, a search space, the search and its
scheduler) and the checks a sweep gets at load: its proxy and every bound of its search space
must make valid runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sfumato.config.base import Frozen, _absolute
from sfumato.config.tree import apply_override, to_dict, validated_as


class Distribution(Frozen):
    """One axis of a search space: log_uniform / uniform over [low, high], or a choice of values."""

    distribution: Literal["log_uniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        if self.distribution == "choice":
            if self.values is None or self.low is not None or self.high is not None:
                raise ValueError("choice takes `values` (a list), not low/high")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"{self.distribution} takes `low` and `high`, not values")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.distribution == "log_uniform" and self.low <= 0:
            raise ValueError(f"log_uniform needs low > 0, got {self.low}")
        return self

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can get: checked against the config at load."""
        return list(self.values) if self.distribution == "choice" else [self.low, self.high]


class SearchConfig(Frozen):
    algorithm: Literal["tpe", "random"] = "tpe"
    """tpe: Optuna's Tree-structured Parzen Estimator (Bergstra et al. 2011) after
    `random_trials` random ones; random: Optuna's random sampler. Both seeded."""
    num_trials: int = Field(16, ge=1)
    random_trials: int = Field(4, ge=1)
    """TPE: trials sampled at random before the model guides the search."""
    seed: int = 0
    max_concurrent_trials: int = Field(2, ge=1)
    """Trials at once; each takes the proxy's train.num_workers workers (x cpus_per_worker, GPUs)."""
    max_failures: int = Field(1, ge=0)
    """Times a trial whose trial process dies is restarted (it resumes from its checkpoint)."""


class SchedulerConfig(Frozen):
    kind: Literal["asha", "fifo"] = "asha"
    """asha: asynchronous successive halving (Li et al. 2020) stops a trial whose val_loss at a
    rung is worse than the best 1/reduction_factor of those recorded there; fifo: every trial
    runs to the end."""
    grace_period_steps: int = Field(10, ge=1)
    """The first rung: no trial is stopped before this optimizer step."""
    reduction_factor: float = Field(4.0, gt=1)
    """Rungs at grace x factor^k steps; about 1/factor of the trials go on past each."""


class TuneConfig(Frozen):
    """`sfumato tune`: this config's full run, scaled down to a proxy by `proxy`, searched over
    `search_space`; the best trial comes back as a full run config."""

    output_dir: Path
    """The sweep folder: trials/<id>/ (each a run folder), results.csv/.md, learning_curves.png,
    best_config.yaml, the Tune experiment (for --resume)."""
    proxy: dict[str, Any] = Field(min_length=1)
    """Dotted overrides that make the proxy of the full run: lower resolution, fewer steps, a
    smaller model, a data fraction, fewer workers. They are proxy-only: the best config keeps
    the full run's values of these keys."""
    search_space: dict[str, Distribution] = Field(min_length=1)
    """Dotted config keys -> distribution; the best values carry over to the full run."""
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    """How the best train.optimizer.lr moves from the proxy's effective batch B_p to the full run's
    B_f: lr x (B_f / B_p) (linear, Goyal et al. 2017), lr x sqrt(B_f / B_p) (sqrt, the rule for
    Adam, Malladi et al. 2022), or unchanged. A tuned ema.decay is moved to the same half-life in
    images: decay^(B_f / B_p)."""

    @field_validator("output_dir")
    @classmethod
    def _abs(cls, value: Path) -> Path:
        return _absolute(value)


# ------------------------------------------------------------------- the sweep's proxy (tune)
# A sweep's proxy is the full run with `tune.proxy` applied; a trial is the proxy with one sample
# of `tune.search_space`. Both are config trees validated like any config (sfumato.tune.space
# builds trials and the best config from them; `check_sweep` runs when a config is loaded).
# They are validated against the schema of the config they come from (`type(cfg)`, the root
# Config), which this module does not import: the root's own validator calls `check_sweep`.

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
    tree = to_dict(cfg)
    tree.pop("tune", None)
    tree.pop("pipeline", None)
    return tree


def apply(tree: dict, values: dict[str, Any]) -> dict:
    """A copy of `tree` with dotted keys set."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        if key in EXCLUSIVE:
            apply_override(tree, EXCLUSIVE[key], None)
        apply_override(tree, key, value)
    return tree


def proxy_tree(cfg) -> dict:
    return apply(run_tree(cfg), cfg.tune.proxy)


def check_sweep(cfg) -> None:
    """At load: the proxy is a valid run with a validation loss, no key is both proxy-only and
    tuned, none changes what that loss measures (LOSS_DEFINING), ASHA's first rung falls inside
    the proxy, and every bound or choice of the search space makes a valid proxy run."""
    tune, schema = cfg.tune, type(cfg)
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
                    "best runs with `sfumato evaluate`"
                )
    for key in tune.search_space:
        clash = [p for p in tune.proxy if key == p or key.startswith(p + ".") or p.startswith(key + ".")]
        if clash:
            raise ValueError(
                f"tune.search_space.{key} is also set by tune.proxy.{clash[0]}: a tuned key must "
                "carry over to the full run, a proxy key never does"
            )
    proxy = validated_as(schema, proxy_tree(cfg), "tune.proxy applied to the full run")
    if proxy.train.validation is None:
        raise ValueError(
            "tune: the proxy has no train.validation; trials are compared on their validation loss, "
            "so set train.validation in the run or in tune.proxy"
        )
    total = proxy.train.total_steps
    if tune.scheduler.kind == "asha" and tune.scheduler.grace_period_steps >= total:
        raise ValueError(
            f"tune.scheduler.grace_period_steps={tune.scheduler.grace_period_steps} is not below the "
            f"proxy's {total} steps: ASHA could stop nothing"
        )
    if proxy.train.validation.every_steps > tune.scheduler.grace_period_steps and tune.scheduler.kind == "asha":
        raise ValueError(
            f"train.validation.every_steps={proxy.train.validation.every_steps} (in the proxy) is above "
            f"tune.scheduler.grace_period_steps={tune.scheduler.grace_period_steps}: ASHA's first rung "
            "would see no validation loss"
        )
    base = proxy_tree(cfg)
    for key, distribution in tune.search_space.items():
        for value in distribution.extremes():
            validated_as(schema, apply(base, {key: value}), f"tune.search_space.{key} = {value!r} in the proxy")
