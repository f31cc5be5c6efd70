"""Exponential moving average of the weights, updated after every optimizer step.

    ema <- beta * ema + (1 - beta) * theta

beta comes either from a fixed `decay` or, as in EDM (Karras et al. 2022), from a half-life
measured in training samples: beta = 0.5 ** (samples_per_step / halflife_samples), so the
average forgets at the same rate per image whatever the batch size or worker count.
The EMA copy is what samples, evaluation and export use.
"""

from __future__ import annotations

import torch


def ema_beta(decay: float | None, halflife_samples: float | None, samples_per_step: int) -> float:
    if (decay is None) == (halflife_samples is None):
        raise ValueError("give exactly one of decay and halflife_samples")
    if decay is not None:
        return decay
    return 0.5 ** (samples_per_step / halflife_samples)


class EMA:
    def __init__(self, model: torch.nn.Module, beta: float):
        self.beta = beta
        self.params = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1.0 - self.beta)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for target, source in zip(model.parameters(), self.params):
            target.copy_(source.to(target.dtype))

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Named tensors (for safetensors): the model's parameter names, EMA values."""
        names = [name for name, _ in model.named_parameters()]
        return {name: p.contiguous() for name, p in zip(names, self.params)}

    def load_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        names = [name for name, _ in model.named_parameters()]
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.params = [state[n].detach().clone().float() for n in names]
