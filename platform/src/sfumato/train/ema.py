"""Exponential moving average of the weights, updated after every optimizer step.

    ema <- beta * ema + (1 - beta) * theta

beta comes either from a fixed `decay` or, as in EDM (Karras et al. 2022), from a half-life
measured in training samples: beta = 0.5 ** (samples_per_step / halflife_samples), so the
average forgets at the same rate per image whatever the batch size or worker count. A
curriculum stage with another effective batch gets its own beta (`stage_beta`, set at every
stage start and after a resume), so the half-life in images holds across stages.
The EMA copy is what samples, evaluation and export use.
"""

from __future__ import annotations

import math

import torch


def ema_beta(
    decay: float | None,
    halflife_samples: float | None,
    samples_per_step: float,
    decay_samples_per_step: float | None = None,
) -> float:
    """beta for steps of `samples_per_step` images. A `decay` is the per-step beta at
    `decay_samples_per_step` images per step (default: these steps'); at another batch it becomes
    decay ** (samples_per_step / decay_samples_per_step), the same half-life in images."""
    if (decay is None) == (halflife_samples is None):
        raise ValueError("give exactly one of decay and halflife_samples")
    if decay is not None:
        return decay ** (samples_per_step / (decay_samples_per_step or samples_per_step))
    return 0.5 ** (samples_per_step / halflife_samples)


def halflife_images(beta: float, samples_per_step: float) -> float:
    """Images after which a change in the weights is half absorbed: beta ** (H / B) = 0.5."""
    return samples_per_step * math.log(0.5) / math.log(beta)


def stage_beta(train_cfg, stage) -> float:
    """beta for one curriculum stage, from its own effective batch. A fixed `train.ema.decay`
    holds at the run's mean effective batch (the batch `sfumato tune` moves a tuned decay to)."""
    e = train_cfg.ema
    return ema_beta(e.decay, e.halflife_samples, train_cfg.effective_batch(stage), train_cfg.mean_effective_batch)


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: under ZeRO-3 its flat partition (`ds_tensor`),
    otherwise the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    """The average of each parameter, in fp32. Under ZeRO-3 every rank averages only its own
    partition (memory falls with the worker count, as the weights' does); `state_dict` gathers
    the full tensors and `load_state_dict` takes each rank's slice back, so both are collective
    calls there and must run on every rank."""

    def __init__(self, model: torch.nn.Module, beta: float, trainable_only: bool = False):
        self.beta = beta
        self.trainable_only = trainable_only  # LoRA: the state holds the adapters alone
        # A frozen parameter (a pretrained text encoder with train_encoder: false, the base under
        # LoRA) never changes, so its average is itself: it is read from the model when the state
        # is saved, never copied or averaged (a frozen T5-XXL encoder would be 19 GB of fp32
        # copies, lerped every step, for nothing).
        averaged = self._averaged(model)
        self.names = [n for n, _ in averaged]
        self.params = [_local(p).detach().clone().float() for _, p in averaged]
        self.frozen = (
            {} if trainable_only else {n: _local(p) for n, p in model.named_parameters() if not p.requires_grad}
        )

    @staticmethod
    def _averaged(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = [_local(p).detach().float() for _, p in self._averaged(model)]
        torch._foreach_lerp_(self.params, current, 1.0 - self.beta)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Into an unpartitioned model of the same architecture (frozen weights too, unless
        trainable_only)."""
        sources = {**self.frozen, **dict(zip(self.names, self.params))}
        for name, target in model.named_parameters():
            if name in sources:
                target.copy_(sources[name].to(target.dtype))

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Named full tensors (for safetensors): the model's parameter names, EMA values (a frozen
        parameter's own value; none of them with trainable_only)."""
        averaged = dict(zip(self.names, self.params))
        return {
            name: _gather(p, averaged[name] if name in averaged else _local(p).detach().float()).contiguous()
            for name, p in model.named_parameters()
            if name in averaged or not self.trainable_only
        }

    def load_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The averages back (frozen parameters' entries are not read: the model holds them)."""
        named = self._averaged(model)
        missing = [n for n, _ in named if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.params = [_scatter(p, state[n]).detach().clone().float().to(_local(p).device) for n, p in named]


def _gather(p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    if not hasattr(p, "ds_tensor"):
        return shard
    import torch.distributed as dist

    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, shard)
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()


def _scatter(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if not hasattr(p, "ds_tensor"):
        return full
    import torch.distributed as dist

    size = p.ds_tensor.numel()  # DeepSpeed: rank r holds elements [r*size, (r+1)*size), zero-padded
    flat = full.flatten()
    flat = torch.cat([flat, flat.new_zeros(size * dist.get_world_size() - flat.numel())])
    return flat[dist.get_rank() * size : (dist.get_rank() + 1) * size]
