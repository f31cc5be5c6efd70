"""Post-training, part 2 (`sfumato align`): Diffusion-DPO of a trained model on preference pairs.

An alignment is an ordinary run (Ray Train + DeepSpeed, checkpoints, exact resume, metrics,
grids, report) resolved like a fine-tune (sfumato.train.finetune.start_from: the parent's EMA
weights or a diffusers export, align.overrides, align.lora as train.lora) whose data are the
pairs table and whose loss is sfumato.diffusion.dpo's, against a frozen copy of the weights it
started from (the reference: rebuilt from the lineage at every start, so a resumed run compares
with the same reference). `train.dpo` in the run's config.yaml says so; the lineage records the
pairs file, its SHA-256 and its pair count, so the report and model card name the data.

Logged: the DPO loss and the implicit reward accuracy and margin of every logged step's batch;
on the held-out pairs (align.holdout_fraction), with the EMA weights, at every grid / validation
point and at the end: `heldout_dpo_loss`, `heldout_reward_accuracy`, `heldout_reward_margin`,
and `policy_distance`, ||theta - theta_ref|| / ||theta_ref|| over the trained parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace
from pathlib import Path

import torch

from sfumato.config import Config, validated
from sfumato.records import AlignmentStepRecord, AlignmentValidationRecord


def run_config(
    cfg: Config,
    parent: Path | None = None,
    checkpoint: str | None = None,
    pretrained: str | None = None,
    pairs: Path | None = None,
) -> Config:
    """The alignment's own config (see the module docstring); errors before any work: no pairs
    file, a table that is not one, too few pairs."""
    from sfumato.data.pairs import PairSet
    from sfumato.train.finetune import same_start, start_from

    al = cfg.align
    if al is None:
        raise ValueError("the config has no `align` section (README: Alignment)")
    tree, lineage = start_from(cfg, al, "align", parent, checkpoint, pretrained)
    pairs = Path(pairs or al.pairs).resolve()
    conditioning = tree["train"].get("conditioning", "class")
    classes = _start_classes(lineage) if conditioning == "class" else None
    # Readable, with a pairs table's columns and (class models) only the model's classes.
    count = len(PairSet(pairs, conditioning if classes is not None else "none", classes))
    if count == 0:
        raise ValueError(f"align.pairs: {pairs} holds no pair")
    lineage.update(pairs=str(pairs), pairs_sha256=hashlib.sha256(pairs.read_bytes()).hexdigest(), pair_count=count)
    tree["train"]["dpo"] = {"pairs": str(pairs), "beta": al.beta, "holdout_fraction": al.holdout_fraction}
    if "train.spike_guard" not in al.overrides:
        # The DPO loss heads for 0 and a hard pair lifts a batch to ~0.7 again: "k x its running
        # average" is then no spike. Non-finite losses still stop the run; a guard set in the
        # overrides is kept.
        tree["train"]["spike_guard"] = None
    for lever in ("routing", "masking", "repa"):
        if f"train.{lever}" not in al.overrides:
            # The DPO loss compares the policy's and the reference's errors on every pixel of the
            # same noisy image: a DiT parent's token levers (and REPA, which the DPO loss does not
            # add) are for pre-training, not for this.
            tree["train"][lever] = None
    same_start(Path(tree["train"]["output_dir"]).resolve(), lineage)
    return validated(tree, "align.overrides applied to the run")


def _start_classes(lineage: dict) -> dict | None:
    """The class -> index map of the weights the alignment starts from (None: not known here)."""
    import json

    from sfumato.layout import RunFolder

    if lineage.get("parent"):
        path = RunFolder(lineage["parent"]).classes
        return json.loads(path.read_text()) if path.exists() else None
    index = Path(lineage["pretrained"]) / "model_index.json"
    names = json.loads(index.read_text()).get("class_names") if index.is_file() else None
    return None if not names else {name: i for i, name in enumerate(names)}


def reference_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference: a copy of the starting weights, in eval mode, never trained."""
    import copy

    reference = copy.deepcopy(denoiser).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def load_pairs(cfg: Config, class_names: list[str]):
    """(the PairSet, its training rows, its held-out rows)."""
    from sfumato.data.pairs import PairSet

    d = cfg.train.dpo
    classes = {name: index for index, name in enumerate(class_names)}
    pairs = PairSet(d.pairs, cfg.train.conditioning, classes)
    training, heldout = pairs.split(d.holdout_fraction)
    if len(training) == 0:
        raise ValueError(
            f"{d.pairs}: all {len(pairs)} pairs are held out (align.holdout_fraction={d.holdout_fraction})"
        )
    return pairs, training, heldout


def pair_inputs(batch: dict, state, generator: torch.Generator, dtype: torch.dtype):
    """(chosen x0, rejected x0, conditions without dropout) of a pair batch."""
    from sfumato.train.step import conditions, model_inputs

    chosen, classes = model_inputs(batch, state, generator, dtype)
    rejected, _ = model_inputs({**batch, "image": batch["rejected"]}, state, generator, dtype)
    return chosen, rejected, conditions(batch, classes, state, dropout=0.0)


class Alignment:
    """The Diffusion-DPO training task (the interface: sfumato.train.tasks.Task): batches of
    preference pairs dealt to the ranks (sfumato.data.pairs.pair_batches), the DPO loss against
    the frozen reference, and as validation, with every grid and at validation steps, the held-out
    pairs' figures and the policy's distance from the reference. Built before the denoiser is
    compiled or partitioned: the reference is a copy of the weights the alignment starts from."""

    def __init__(self, cfg: Config, denoiser: torch.nn.Module, class_names: list[str]):
        self.cfg, self.beta = cfg, cfg.train.dpo.beta
        self.reference = reference_copy(denoiser)
        self.pairs, self.training_rows, self.heldout_rows = load_pairs(cfg, class_names)

    def batches(self, stage_index: int, rank: int, world: int, position: dict | None):
        from sfumato.data.pairs import pair_batches

        stage = self.cfg.train.stages[stage_index]
        return pair_batches(
            self.pairs,
            self.training_rows,
            stage.micro_batch_size,
            stage.resolution_px,
            rank,
            world,
            self.cfg.seed + stage_index,
            position,
        )

    def loss(self, model, batch: dict, state) -> tuple[torch.Tensor, dict]:
        """The DPO loss of a pair batch (sfumato.diffusion.dpo), and its reward statistics."""
        from sfumato.diffusion.dpo import pair_loss

        chosen, rejected, cond = pair_inputs(batch, state, state.generator, state.dtype)
        resolution_px = chosen.shape[-1] * (state.codec.downsample if state.codec is not None else 1)
        return pair_loss(
            model,
            self.reference,
            chosen,
            rejected,
            cond,
            state.schedule,
            state.diffusion_cfg,
            self.beta,
            state.generator,
            resolution_px,
        )

    def validation_due(self, step: int, last: bool, sample_now: bool) -> bool:
        """With every grid, and at train.validation.every_steps."""
        v = self.cfg.train.validation
        return sample_now or (v is not None and step % v.every_steps == 0)

    def validate(self, model, stage_index: int, state) -> tuple[AlignmentValidationRecord]:
        v, stage = self.cfg.train.validation, self.cfg.train.stages[stage_index]
        held = self.heldout_stats(
            model, stage.resolution_px, stage.micro_batch_size, state, v.seed if v is not None else 0
        )
        return (replace(held, policy_distance=policy_distance(model, self.reference)),)

    def log_records(self, out: dict, position: dict | None) -> tuple[AlignmentStepRecord]:
        """The batch's reward accuracy and margin: stats of the DPO loss, named as the record's fields."""
        return (_rewards(out),)

    @torch.no_grad()
    def heldout_stats(self, model, resolution_px: int, batch_size: int, state, seed: int) -> AlignmentValidationRecord:
        """DPO loss, reward accuracy and margin of `model` (the EMA weights) on the held-out pairs,
        each batch noised from (seed, batch index): every evaluation sees the same noise. None of
        them without held-out pairs."""
        from sfumato.diffusion.dpo import pair_loss

        rows = self.heldout_rows
        if len(rows) == 0:
            return AlignmentValidationRecord()
        dtype = next(model.parameters()).dtype
        loss_sum = accuracy_sum = margin_sum = 0.0
        count = 0
        for index, start in enumerate(range(0, len(rows), batch_size)):
            batch = self.pairs.batch(rows[start : start + batch_size], resolution_px)
            generator = torch.Generator(state.device).manual_seed(seed * 100_003 + index)
            chosen, rejected, cond = pair_inputs(batch, state, generator, dtype)
            loss, stats = pair_loss(
                model,
                self.reference,
                chosen,
                rejected,
                cond,
                state.schedule,
                state.diffusion_cfg,
                self.beta,
                generator,
                resolution_px,
            )
            n, rewards = len(batch["id"]), _rewards(stats)
            loss_sum += float(loss) * n
            accuracy_sum += rewards.reward_accuracy * n
            margin_sum += rewards.reward_margin * n
            count += n
        return AlignmentValidationRecord(loss_sum / count, accuracy_sum / count, margin_sum / count)


def _rewards(stats: dict) -> AlignmentStepRecord:
    """The DPO loss's reward statistics (sfumato.diffusion.dpo names them as the record's fields),
    read back from the device."""
    return AlignmentStepRecord(**{f.name: float(stats[f.name]) for f in fields(AlignmentStepRecord)})


@torch.no_grad()
def policy_distance(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """||theta - theta_ref|| / ||theta_ref|| over the parameters that train (LoRA: the adapters,
    whose reference is their zero update)."""
    ref = dict(reference.named_parameters())
    moved, norm = 0.0, 0.0
    for name, parameter in model.named_parameters():
        if name not in ref or not name_trains(name, model):
            continue
        moved += float((parameter.float() - ref[name].float()).pow(2).sum())
        norm += float(ref[name].float().pow(2).sum())
    return (moved**0.5) / (norm**0.5) if norm else moved**0.5


def name_trains(name: str, model: torch.nn.Module) -> bool:
    """LoRA runs train only the adapters (names with lora_); full runs every parameter."""
    has_lora = any("lora_" in n for n, _ in model.named_parameters())
    return "lora_" in name if has_lora else True
