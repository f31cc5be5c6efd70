"""The training step, in plain PyTorch: `train_step(state, batch)` and `loss_fn(model, ...)`.

The engine is anything with DeepSpeed's four calls (forward, `backward`, `step`,
`is_gradient_accumulation_boundary`): the DeepSpeed engine in a Ray worker, or `PlainEngine`
(model + AdamW + LR schedule) in unit tests and in the benchmark's baseline. Ray, DeepSpeed and
logging wrap this; nothing here knows about them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sfumato.diffusion.loss import diffusion_loss, drop_conditions, validation_loss
from sfumato.diffusion.schedule import NoiseSchedule


class NonFiniteError(RuntimeError):
    """NaN/Inf in the loss or the gradients: retrying would replay it, so the run stops."""


def lr_at(step: int, opt_cfg, total_steps: int) -> float:
    """Linear warmup to lr, then constant or cosine decay to lr * min_lr_ratio."""
    if opt_cfg.warmup_steps and step < opt_cfg.warmup_steps:
        return opt_cfg.lr * (step + 1) / opt_cfg.warmup_steps
    if opt_cfg.lr_schedule == "constant":
        return opt_cfg.lr
    span = max(1, total_steps - opt_cfg.warmup_steps)
    progress = min(1.0, (step - opt_cfg.warmup_steps) / span)
    floor = opt_cfg.lr * opt_cfg.min_lr_ratio
    return floor + (opt_cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class PlainEngine:
    """Model + AdamW with DeepSpeed's calling convention (single process, no ZeRO)."""

    def __init__(self, model: torch.nn.Module, opt_cfg, grad_accum_steps: int = 1, grad_clip_norm: float | None = None):
        self.module = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],  # as the worker's: frozen ones hold no state
            lr=opt_cfg.lr,
            betas=tuple(opt_cfg.betas),
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
        )
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip_norm = grad_clip_norm
        self.micro_steps = 0
        self.grad_norm: float | None = None

    def __call__(self, *args):
        return self.module(*args)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm or float("inf"))
            self.grad_norm = float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class GradientWatch:
    """Flags a non-finite gradient as it is produced (a hook per parameter), so the check runs
    before the optimizer step under every ZeRO stage, where .grad may already be partitioned.
    The flag stays on the gradients' device until the accumulation boundary reads it."""

    def __init__(self, model: torch.nn.Module):
        self.bad: torch.Tensor | None = None
        self.handles = [p.register_hook(self._check) for p in model.parameters() if p.requires_grad]

    def _check(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self.bad = bad if self.bad is None else self.bad | bad

    def flag(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((), dtype=torch.bool, device=device) if self.bad is None else self.bad.to(device)

    def reset(self) -> None:
        self.bad = None


@dataclass
class TrainState:
    engine: object
    schedule: NoiseSchedule
    diffusion_cfg: object
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype = torch.float32
    null_class: int | None = None
    """Class conditioning: the "no class" label that dropped samples get."""
    tokenizer: object = None
    """Text conditioning: captions -> token ids; dropped samples get the empty caption's."""
    max_length: int = 32
    codec: object = None
    """Latent mode: the frozen VAE (sfumato.models.vae.LatentCodec) the images pass through."""
    watch: GradientWatch | None = None
    all_ranks_any: object = None
    """Callable(bool tensor) -> the same flags OR-ed over ranks, on the host (None: one process)."""
    step: int = 0
    """Optimizer steps taken."""
    micro_step: int = 0
    stats: dict = field(default_factory=dict)
    bad_loss: torch.Tensor | None = None
    """A non-finite loss since the last optimizer step, kept on the device until the boundary."""
    repa: object = None
    """train.repa: the frozen image encoder the DiT's tokens align to (sfumato.models.repa)."""


def batch_to_tensors(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images in [0, 255] -> float NCHW in [-1, 1]; class indices (-1: none)."""
    images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device)
    x0 = images.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
    classes = torch.from_numpy(np.asarray(batch["class"], dtype=np.int64)).to(device)
    return x0, classes


def model_inputs(
    batch: dict, state: TrainState, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, class indices) of a batch: the images in [-1, 1], or in latent mode their scaled
    latents drawn with `generator`, from the posterior mean and std the latent cache put in the
    batch (sfumato.models.cache), else through the VAE's encoder. Both make the same draw."""
    from sfumato.models.cache import LATENT_MEAN, LATENT_STD

    if LATENT_MEAN not in batch:
        x0, classes = batch_to_tensors(batch, state.device, dtype)
        return (x0 if state.codec is None else state.codec.encode(x0, generator)), classes
    from sfumato.models.vae import draw_latents

    mean, std = (
        torch.from_numpy(np.asarray(batch[k], dtype=np.float32)).to(state.device) for k in (LATENT_MEAN, LATENT_STD)
    )
    classes = torch.from_numpy(np.asarray(batch["class"], dtype=np.int64)).to(state.device)
    return draw_latents(mean, std, generator, state.codec.scale, state.codec.shift).to(dtype), classes


def conditions(
    batch: dict, classes: torch.Tensor, state: TrainState, dropout: float | None = None
) -> torch.Tensor | None:
    """The micro-batch's conditioning with classifier-free-guidance dropout applied (the config's,
    or `dropout`): class indices, token ids, or (the cache of a frozen encoder) its states, the
    "no class" / empty-caption value where dropped or missing."""
    if state.tokenizer is None and state.null_class is None:
        return None
    probability = state.diffusion_cfg.condition_dropout if dropout is None else dropout
    # Drawn on the generator's device (CUDA on GPUs), then used where the batch lives.
    dropped = drop_conditions(len(classes), probability, state.generator, state.generator.device).to(classes.device)
    if state.tokenizer is not None:
        from sfumato.models.cache import TEXT_EMPTY, TEXT_STATES
        from sfumato.models.text import tokenize

        if TEXT_STATES in batch:  # a frozen encoder's cached states: the denoiser skips its encoder
            states, empty = (
                torch.from_numpy(np.asarray(batch[k], dtype=np.float32)).to(classes.device)
                for k in (TEXT_STATES, TEXT_EMPTY)
            )
            return torch.where(dropped[:, None, None], empty, states)
        ids = tokenize(state.tokenizer, list(batch["caption"]) + [""], state.max_length).to(classes.device)
        return torch.where(dropped[:, None], ids[-1:], ids[:-1])
    return torch.where(dropped | (classes < 0), torch.full_like(classes, state.null_class), classes)


def loss_fn(model, x0: torch.Tensor, cond: torch.Tensor | None, state: TrainState) -> tuple[torch.Tensor, dict]:
    """The diffusion loss of one micro-batch."""
    resolution_px = x0.shape[-1] * (state.codec.downsample if state.codec is not None else 1)
    return diffusion_loss(model, x0, cond, state.schedule, state.diffusion_cfg, state.generator, resolution_px)


def image_loss(model, batch: dict, state: TrainState) -> tuple[torch.Tensor, dict]:
    """The diffusion loss of a micro-batch of images (pre-training, fine-tuning): the batch's x0
    and its conditions with classifier-free-guidance dropout, then `loss_fn`."""
    x0, classes = model_inputs(batch, state, state.generator, state.dtype)
    loss, stats = loss_fn(model, x0, conditions(batch, classes, state), state)
    if state.repa is None:
        return loss, stats
    from sfumato.models.repa import alignment_loss

    if "image" not in batch:
        raise ValueError(
            "train.repa aligns to the encoder's features of the clean images, and this run's batches hold "
            "only cached latents (sfumato cache): set data.cache.enabled: false to use REPA"
        )
    images = x0 if state.codec is None else batch_to_tensors(batch, state.device, torch.float32)[0]
    align = alignment_loss(model, images, state.repa)
    return loss + state.repa.weight * align, {**stats, "repa_loss": align.detach()}


def _check_finite(state: TrainState) -> None:
    """At the accumulation boundary, before the optimizer step: one read-back (and one
    all-reduce) of the loss and gradient flags gathered on the device over the micro-steps, so
    that all ranks raise at the same step and no update with a NaN in it is ever applied."""
    device = state.bad_loss.device
    flags = torch.stack(
        [
            state.bad_loss,
            state.watch.flag(device) if state.watch is not None else torch.zeros((), dtype=torch.bool, device=device),
        ]
    )
    bad_loss, bad_gradient = (state.all_ranks_any(flags) if state.all_ranks_any else flags.cpu()).tolist()
    state.bad_loss = None
    if state.watch is not None:
        state.watch.reset()
    where = f"at step {state.step} (micro-step {state.micro_step})"
    if bad_loss:
        raise NonFiniteError(f"non-finite loss {where}")
    if bad_gradient:
        raise NonFiniteError(f"non-finite gradient {where}")


def train_step(state: TrainState, batch: dict, batch_loss=image_loss) -> dict:
    """One micro-batch: forward, backward and, at an accumulation boundary, the finite checks on
    all ranks and the optimizer step. `batch_loss(model, batch, state) -> (loss, stats)` is the
    training task's (sfumato.train.tasks): the diffusion loss of images by default. Returns the
    micro-batch's loss and stats as device tensors (read them back only when logging: each read
    waits for the GPU) and `optimizer_step`."""
    loss, stats = batch_loss(state.engine, batch, state)
    bad = ~torch.isfinite(loss.detach())
    state.bad_loss = bad if state.bad_loss is None else state.bad_loss | bad
    state.engine.backward(loss)
    boundary = state.engine.is_gradient_accumulation_boundary()
    if boundary:
        _check_finite(state)
    state.engine.step()
    state.micro_step += 1
    if boundary:
        state.step += 1
    return {"loss": loss.detach(), "optimizer_step": boundary, **stats}


@torch.no_grad()
def validate(model, batches: list[dict], state: TrainState, num_timesteps: int, seed: int) -> float:
    """The validation loss of `model` (the EMA weights) on held-out batches: the plain MSE of
    `validation_loss` at `num_timesteps` evenly spaced timesteps, each batch noised from
    (seed, batch index), so every evaluation of a run, and of every run, sees the same noise."""
    dtype = next(model.parameters()).dtype
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        generator = torch.Generator(state.device).manual_seed(seed * 100_003 + index)
        x0, classes = model_inputs(batch, state, generator, dtype)
        cond = conditions(batch, classes, state, dropout=0.0)
        per_image = validation_loss(model, x0, cond, state.schedule, state.diffusion_cfg, num_timesteps, generator)
        total += float(per_image.sum())
        count += len(per_image)
    return total / count
