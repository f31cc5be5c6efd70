"""What a run trains: one task object per kind of run, which the one worker loop runs alike
(sfumato.train.worker never asks which task it runs; issue 33).

    PreTraining   the diffusion loss on the shards' images; validation: the held-out images' loss
    FineTuning    pre-training on the manifest rows a fine-tune selected (sfumato.train.finetune)
    Alignment     Diffusion-DPO on preference pairs against a frozen reference (sfumato.train.align)

A task gives the loop its micro-batches, the loss that `train_step` backpropagates, when and how
to validate the EMA weights, and its own fields of a logged step. `make_task` picks the task the
run's config describes, once, when the worker is set up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Protocol

import torch

from sfumato.config import Config
from sfumato.layout import DataFolder
from sfumato.records import Record, SourceSharesRecord, ValidationRecord


class Task(Protocol):
    def batches(self, stage_index: int, rank: int, world: int, position: dict | None) -> Iterator[tuple[dict, dict]]:
        """This rank's endless (micro-batch, loader position after it) at a curriculum stage,
        resumed exactly from a checkpoint's `position` (None: from the start)."""

    def loss(self, model, batch: dict, state) -> tuple[torch.Tensor, dict]:
        """A micro-batch's loss and stats as device tensors (sfumato.train.step.train_step)."""

    def validation_due(self, step: int, last: bool, sample_now: bool) -> bool:
        """Whether optimizer step `step` validates (`last`: the run's last; `sample_now`: a grid is due)."""

    def validate(self, model, stage_index: int, state) -> tuple[Record, ...]:
        """Rank 0, on a copy holding the EMA weights: the validation's metrics records."""

    def log_records(self, out: dict, position: dict | None) -> tuple[Record, ...]:
        """The task's own records of a logged step, from its last micro-batch's `out` and the
        loader position after it."""


def make_task(cfg: Config, run_model) -> Task:
    """The task cfg.train describes: an alignment (train.dpo), a fine-tune (train.lineage) or a
    pre-training. Called before the denoiser is compiled or partitioned (an alignment copies its
    starting weights then)."""
    if cfg.train.dpo is not None:
        from sfumato.train.align import Alignment

        return Alignment(cfg, run_model.denoiser, run_model.class_names)
    if cfg.train.lineage is not None:
        return FineTuning(cfg)
    return PreTraining(cfg)


class PreTraining:
    """The diffusion loss on the images of the shards (sfumato.data.loader), minus the held-out
    ones that validation reads (train.validation.holdout_fraction) and past the data fraction;
    class-balanced with train.class_balanced; from the latent cache when it is complete."""

    def __init__(self, cfg: Config, ids: frozenset | None = None):
        self.cfg, self.ids = cfg, ids  # ids: only these samples (None: all)
        self.class_weights = class_weights(cfg)
        self.validation_sets: dict[int, list[dict]] = {}  # resolution -> held-out batches (rank 0)

    @property
    def shards(self):
        return DataFolder(self.cfg.data.output_dir).shard_folder

    def batches(self, stage_index: int, rank: int, world: int, position: dict | None):
        from sfumato.data.loader import ReadPlan, shard_paths, training_batches, training_range

        t, d = self.cfg.train, self.cfg.data
        stage = t.stages[stage_index]
        # Validation reads only held-out samples, training only the rest (a data fraction of it).
        split = training_range(t.validation.holdout_fraction if t.validation else 0.0, t.data_fraction)
        plan = ReadPlan(
            shard_paths(self.shards.root, stage.resolution_px),
            rank,
            world,
            self.cfg.seed + stage_index,
            split,
            self.ids,
            self.class_weights,
        )
        batches = iter(
            training_batches(
                plan,
                stage.micro_batch_size,
                stage.resolution_px,
                position,
                d.source_weights,
                bucketed=d.shards.buckets is not None,
            )
        )
        cache = self.latent_cache(stage.resolution_px, announce=rank == 0)
        return batches if cache is None else cache.attach_all(batches)

    def loss(self, model, batch: dict, state) -> tuple[torch.Tensor, dict]:
        from sfumato.train.step import image_loss

        return image_loss(model, batch, state)

    def validation_due(self, step: int, last: bool, sample_now: bool) -> bool:
        v = self.cfg.train.validation
        return v is not None and (step % v.every_steps == 0 or last)

    def validate(self, model, stage_index: int, state) -> tuple[ValidationRecord]:
        from sfumato.train.step import validate

        v, resolution_px = self.cfg.train.validation, self.cfg.train.stages[stage_index].resolution_px
        if resolution_px not in self.validation_sets:
            self.validation_sets[resolution_px] = self.validation_set(resolution_px)
        return (ValidationRecord(validate(model, self.validation_sets[resolution_px], state, v.num_timesteps, v.seed)),)

    def validation_set(self, resolution_px: int) -> list[dict]:
        from sfumato.data.loader import shard_paths, validation_batches

        v = self.cfg.train.validation
        batches = validation_batches(
            shard_paths(self.shards.root, resolution_px),
            resolution_px,
            v.holdout_fraction,
            v.max_samples,
            v.batch_size,
            bucketed=self.cfg.data.shards.buckets is not None,
            ids=self.ids,
        )
        cache = self.latent_cache(resolution_px, announce=False)
        return batches if cache is None else [cache.attach(b) for b in batches]

    def log_records(self, out: dict, position: dict | None) -> tuple[SourceSharesRecord, ...]:
        """With data.sources weights: this rank's realised share of each source in the stage so
        far (every rank draws with the same weights)."""
        from sfumato.data.loader import source_shares

        shares = source_shares(position)
        return () if shares is None else (SourceSharesRecord({name: round(s, 4) for name, s in shares.items()}),)

    def latent_cache(self, resolution_px: int, announce: bool):
        """The stage's cache (sfumato.models.cache) when it is complete for these shards and this
        VAE / frozen text encoder: batches then carry each image's posterior mean and std (and its
        caption's encoder states) and those encoders never run. None: encode on the fly (nothing
        to cache, no cache, or an incomplete one)."""
        from sfumato.models.cache import LatentCache, cache_enabled
        from sfumato.train.ranks import say

        if cache_enabled(self.cfg) is not None:
            return None
        cache = LatentCache.open(self.cfg, resolution_px)
        if announce:
            say(
                f"{resolution_px}px: training from the cache {cache.folder.root}"
                if cache is not None
                else f"{resolution_px}px: no complete cache for this VAE / frozen text encoder (`sfumato cache` "
                "builds it): they encode every batch"
            )
        return cache


class FineTuning(PreTraining):
    """Pre-training's loss and validation on the manifest rows finetune.select kept (the run
    folder's selected_ids.txt, sfumato.train.finetune), from the parent's weights."""

    def __init__(self, cfg: Config):
        from sfumato.train.finetune import selected_ids

        super().__init__(cfg, ids=selected_ids(cfg))


def class_weights(cfg: Config) -> dict | None:
    """train.class_balanced: class index -> acceptance probability (the shards' class weights)."""
    if not cfg.train.class_balanced:
        return None
    shards = DataFolder(cfg.data.output_dir).shard_folder
    classes = json.loads(shards.classes.read_text())
    if not classes:
        raise ValueError("train.class_balanced needs classes (tags) in the shards, and they have none")
    weights = json.loads(shards.class_weights.read_text())
    return {classes[tag]: weight for tag, weight in weights.items()}
