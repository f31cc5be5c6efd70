"""The `train` section: the model and its conditioning (text encoder, VAE), the curriculum's
stages, optimizer, EMA, sample grids, validation loss, the loss-spike guard, and the
post-training keys (lora, lineage, dpo) that `sfumato finetune` and `sfumato align` set."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sfumato.config.base import Frozen, _absolute
from sfumato.config.diffusion import GuidanceInterval, Sampler
from sfumato.config.posttrain import DPOConfig, LineageConfig, LoraSection
from sfumato.models.names import MODEL_FAMILIES, TEXT_MODELS, TRANSFORMERS


class VAEConfig(Frozen):
    """Latent mode: the denoiser trains on the latents of this frozen AutoencoderKL."""

    pretrained: str
    """Hub id or local folder (safetensors weights), e.g. stabilityai/sd-vae-ft-mse."""
    subfolder: str | None = None
    """Where the VAE sits inside `pretrained` (vae in a Stable Diffusion repo)."""
    scaling_factor: float | None = Field(None, gt=0)
    """Latents are multiplied by this to reach about unit variance; None: the VAE config's."""
    shift_factor: float | None = None
    """Subtracted before scaling (SD3/Flux VAEs); None: the VAE config's, else 0."""


class TextConfig(Frozen):
    """The caption encoder of text-conditional models (train.conditioning: text)."""

    encoder: Literal["clip", "t5"] = "clip"
    """The encoder's class: clip, transformers' CLIPTextModel (Stable Diffusion 1-2); t5, its
    T5EncoderModel (the encoder half of a T5, as in Imagen, PixArt and SD3's third encoder), which
    needs `pretrained`. The denoiser cross-attends to its last hidden states, whose width (T5:
    d_model) sets the UNet's cross-attention width. Checked against the checkpoint's config.json."""
    pretrained: str | None = None
    """Hub id or local folder of the encoder and its tokenizer (safetensors weights), e.g.
    openai/clip-vit-large-patch14, or a T5 with encoder: t5. None: from scratch (clip only), a BPE
    tokenizer trained on the manifest's captions and a randomly initialised CLIPTextModel of the
    size below."""
    encoder_subfolder: str | None = None
    """Where the encoder sits inside `pretrained` (e.g. text_encoder in a Stable Diffusion repo,
    text_encoder_3 for SD3's T5)."""
    tokenizer_subfolder: str | None = None
    train_encoder: bool = True
    """Train the encoder jointly (always, from scratch); False freezes a pretrained one: no
    gradients, no optimizer state, no EMA copy, and `sfumato cache` stores every caption's states
    so the training step does not run it (data.cache)."""
    max_length: int = Field(32, ge=4, le=512)
    """Tokens per caption, start and end tokens included; longer captions are truncated."""
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    """From scratch: the BPE vocabulary, of which the 256 byte tokens and 3 special tokens come first."""
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> TextConfig:
        if self.pretrained is None and not self.train_encoder:
            raise ValueError("train_encoder: false needs a pretrained encoder (a random one would stay random)")
        if self.pretrained is None and self.encoder != "clip":
            raise ValueError(
                f"train.text.encoder: {self.encoder} needs train.text.pretrained (a hub id or folder of a "
                "T5EncoderModel or T5 checkpoint); from scratch the encoder is a CLIPTextModel (encoder: clip)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class StageConfig(Frozen):
    """One resolution of the curriculum; it continues from the previous stage's weights."""

    resolution_px: int = Field(ge=8, le=4096)
    steps: int = Field(ge=1)
    """Optimizer steps in this stage."""
    micro_batch_size: int = Field(ge=1)
    """Samples per worker per forward/backward."""


class OptimizerConfig(Frozen):
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine schedule decays to lr * min_lr_ratio at the last step."""


class EMAConfig(Frozen):
    decay: float | None = Field(None, gt=0, lt=1)
    """Per-step decay at the run's mean effective batch; a stage with another batch B gets
    decay ** (B / mean batch), so every stage keeps the same half-life in images."""
    halflife_samples: float | None = Field(None, gt=0)
    """EDM-style: the average forgets half its past every this many training images (in every
    stage: each stage's per-step beta comes from its own effective batch)."""

    @model_validator(mode="after")
    def _one(self) -> EMAConfig:
        if (self.decay is None) == (self.halflife_samples is None):
            raise ValueError("set exactly one of ema.decay and ema.halflife_samples")
        return self


class SampleConfig(Frozen):
    """The fixed-seed grids written while training (EMA weights): image i always starts from
    seed + i, so grids of two steps differ only by the weights."""

    num_images: int = Field(16, ge=1, le=256)
    seed: int = 0
    steps: int = Field(50, ge=1, le=1000)
    sampler: Sampler = "ddim"
    guidance_scale: float = Field(1.0, ge=0, le=50)
    """Classifier-free guidance (1: none) for class- and text-conditional models."""
    guidance_interval: GuidanceInterval | None = None
    """[lo, hi]: guide only at noise levels t / num_train_timesteps in [lo, hi] (1: pure noise),
    elsewhere one conditional call (Kynkäänniemi et al. 2024). None: at every step."""
    prompts: list[str] | None = Field(None, min_length=1)
    """Text-conditional runs: the grid's captions, cycled. None: the manifest's most frequent
    captions, chosen at the run's first start and kept in text/sample_prompts.json."""
    aspect_ratio: float | None = None
    """With data.shards.buckets: the grid's images at each stage's bucket of this width / height
    (one of the buckets' aspect_ratios, within 1%). None: square, at the stage's resolution."""


class QualityWatchConfig(Frozen):
    """Quality watched during training (sfumato.train.quality): every `every_steps` optimizer steps
    and at the last, rank 0 draws `num_samples` images from the EMA weights on fixed noise and
    fixed conditions (classes or the grid's prompts, cycled) and the domain yardstick scores them
    (evaluate.domain: class accuracy and FD-domain; the data needs classes). The figures go to
    metrics.jsonl, the progress line, wandb and the report's curves. Samples of a lower
    curriculum stage are resized to the yardstick's resolution (the last stage's)."""

    every_steps: int = Field(200, ge=1)
    num_samples: int = Field(64, ge=2, le=10_000)
    """Fewer than the evaluation's: a small FD is biased upwards, so these figures compare points of
    one run (and runs with the same setting), not the evaluation's."""
    steps: int = Field(10, ge=1, le=1000)
    sampler: Sampler = "dpm-solver++"
    guidance_scale: float = Field(1.0, ge=0, le=50)
    guidance_interval: GuidanceInterval | None = None
    seed: int = 0
    """Image i from noise seed + i: every check draws from the same noise."""
    batch_size: int = Field(64, ge=1)


class ValidationConfig(Frozen):
    """A validation loss on images held out of training, chosen by a hash of their id: the same
    split for every run, resolution, worker count and data fraction of the same shards."""

    holdout_fraction: float = Field(0.05, gt=0, le=0.5)
    """Share of the samples (by id hash) that training never sees."""
    max_samples: int = Field(256, ge=1)
    """Held-out images in the loss (the first ones found in the stage's shards)."""
    every_steps: int = Field(100, ge=1)
    """Also at the last step. Tune's early stopping compares trials on these points."""
    num_timesteps: int = Field(8, ge=1, le=1000)
    """Every image is noised at these many evenly spaced timesteps, with fixed noise."""
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class SpikeGuardConfig(Frozen):
    """The loss-spike guard (issue 16): a logged loss above `factor` x its running average
    (train.progress.LossAverage, all ranks' mean) for `patience_logged_steps` logged steps in a
    row rolls every rank back to the newest committed checkpoint from before the spike began and
    continues at `lr_scale` x the learning rate, or stops the run (`action`). The average a
    loss is compared with is the one of the last logged step that was not above it, so a
    lasting spike cannot pull its own yardstick up and hide. NaN/Inf always stops (NonFiniteError)."""

    factor: float = Field(3.0, gt=1)
    """k: a logged loss above k x the running average counts as spiking. Per-batch diffusion
    losses scatter around their average by the timesteps drawn (about 0.4x-1.3x at 8 images a
    batch); 3x is a divergence, not noise."""
    patience_logged_steps: int = Field(2, ge=1)
    """m: consecutive spiking logged steps (train.log_every_steps apart) before the guard acts."""
    armed_after_steps: int = Field(100, ge=1)
    """The guard compares only once the average has seen this many optimizer steps (its
    horizon is ~50 at beta 0.98): the first losses fall fast and the average is still young."""
    action: Literal["rollback", "stop"] = "rollback"
    """rollback: reload the newest committed checkpoint from before the spike and continue;
    stop: end the run with a LossSpikeError (STOPPED.json), not retried."""
    lr_scale: float = Field(0.5, gt=0, le=1)
    """Each rollback multiplies the learning rate by this, for the rest of the run."""
    max_rollbacks: int = Field(2, ge=0)
    """A spike after this many rollbacks stops the run instead."""


class RoutingConfig(Frozen):
    """Token routing (TREAD, Krause et al. 2025) for sfumato's DiTs: in training, a random share
    of each image's tokens skips a span of blocks and rejoins unchanged, so a step costs less;
    sampling, evaluation and export use every token in every block."""

    ratio: float = Field(0.5, gt=0, lt=1)
    """Share of the image tokens that skip (drawn per image, per step)."""
    start_block: int = Field(1, ge=0)
    """The first block the routed tokens skip."""
    end_block: int = -1
    """The block where they rejoin (Python indexing: -1, the last block, runs on every token)."""


class RepaConfig(Frozen):
    """Representation alignment (REPA, Yu et al. 2025) for sfumato's DiTs: in training, a small
    MLP maps the tokens after the first `depth` blocks to a frozen pretrained image encoder's
    features of the clean image, and the loss adds `weight` x (1 - their cosine similarity)
    (sfumato.models.repa). Sampling, evaluation and export do not use it."""

    encoder: str
    """A transformers vision transformer by hub id or folder (facebook/dinov2-base as the paper;
    Dinov2Model, Dinov2WithRegistersModel, ViTModel), loaded frozen."""
    depth: int = Field(4, ge=1)
    """The DiT blocks before the aligned tokens (REPA: 8 of SiT-XL's 28, 4 of SiT-B's 12)."""
    weight: float = Field(0.5, gt=0)
    """lambda: the alignment loss's weight beside the diffusion loss."""
    projector_dim: int = Field(2048, ge=1)
    """The projector MLP's hidden width."""


class MaskingConfig(Frozen):
    """Patch masking (MaskDiT, Zheng et al. 2024; micro_diffusion's recipe) for sfumato's DiTs:
    in training, after the first `mixer_blocks` blocks a random share of each image's tokens is
    dropped and the loss counts the predicted patches only, so a step costs less; the last
    `unmasked_fraction` of the training runs unmasked (the unmasking fine-tune), and sampling,
    evaluation and export use every token."""

    ratio: float = Field(0.5, gt=0, lt=1)
    """Share of the image tokens dropped (drawn per image, per step)."""
    mixer_blocks: int = Field(1, ge=0)
    """Blocks that see every token before the drop (micro_diffusion's patch mixer)."""
    unmasked_fraction: float = Field(0.1, ge=0, lt=1)
    """The share of the run's optimizer steps, at its end, trained without masking."""


class TrainConfig(Frozen):
    output_dir: Path
    """The run folder: config.yaml, checkpoints/, samples/, metrics.jsonl."""
    model: str = "unet-tiny"
    """A name from sfumato.models.registry.MODELS."""
    conditioning: Literal["none", "class", "text"] = "class"
    """class: the innermost tag of each sample; text: its caption (needs a *-text-* model)."""
    text: TextConfig = TextConfig()
    vae: VAEConfig | None = None
    """Set: latent diffusion through this VAE (stage resolutions are pixels; the denoiser sees
    resolution / the VAE's downsampling factor). None: pixel space."""
    class_balanced: bool = False
    """Draw every class (a sample's innermost tag) equally often by subsampling frequent ones."""
    data_fraction: float = Field(1.0, gt=0, le=1)
    """Train on this share of the (not held-out) samples, chosen by id hash: a tuning proxy's
    data subset."""
    validation: ValidationConfig | None = None
    """None: no validation loss (the training loss alone is logged)."""
    quality: QualityWatchConfig | None = None
    """Class accuracy and FD-domain of the EMA weights during training (issue 36). None: only at
    evaluate."""
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each training worker (with its GPU, when use_gpu)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool | None = None
    """Compile the denoiser's network with torch.compile (inductor); None: with GPUs only (on a
    CPU the first steps spend minutes compiling what a short run never earns back)."""
    channels_last: bool | None = None
    """Channels-last (NHWC) memory format for the network; None: with GPUs only."""
    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO 0-3: 1 partitions optimizer state, 2 also gradients, 3 also the weights (and the EMA
    with them) across the data-parallel workers."""
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip_norm: float | None = Field(1.0, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    ema: EMAConfig = EMAConfig(halflife_samples=10_000)
    stages: list[StageConfig] = Field(min_length=1)
    routing: RoutingConfig | None = None
    """Token routing for a DiT (`dit-*`, `dit-text-*`, `mmdit-*`); None: every token, every block."""
    masking: MaskingConfig | None = None
    """Patch masking for a DiT; None: every token predicted."""
    repa: RepaConfig | None = None
    """Representation alignment for a DiT to a frozen image encoder; None: the diffusion loss only."""
    log_every_steps: int = Field(10, ge=1)
    sample_every_steps: int = Field(500, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    spike_guard: SpikeGuardConfig | None = SpikeGuardConfig()
    """Roll back (or stop) on a lasting loss spike; None: no guard (NaN/Inf still stops the run)."""
    wandb: bool = True
    """Log to wandb too (offline mode without WANDB_API_KEY)."""
    sample: SampleConfig = SampleConfig()
    lora: LoraSection | None = None
    """Post-training: train LoRA adapters only (set from finetune.lora by `sfumato finetune`)."""
    lineage: LineageConfig | None = None
    """Post-training: the weights the run starts from and its data filter (set by `sfumato finetune`)."""
    dpo: DPOConfig | None = None
    """Alignment: Diffusion-DPO on preference pairs (set from the align section by `sfumato align`)."""

    @field_validator("lora")
    @classmethod
    def _lora_rate(cls, value: LoraSection | None) -> LoraSection | None:
        if value is not None and value.learning_rate is not None:
            raise ValueError(
                "train.lora.learning_rate is not read: set finetune.lora.learning_rate (or train.optimizer.lr)"
            )
        return value

    @field_validator("output_dir")
    @classmethod
    def _abs(cls, value: Path) -> Path:
        return _absolute(value)

    @field_validator("model")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in MODEL_FAMILIES:
            raise ValueError(f"unknown model {value!r}; registered: {sorted(MODEL_FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _stages(self) -> TrainConfig:
        res = [s.resolution_px for s in self.stages]
        if res != sorted(res):
            raise ValueError(f"curriculum stages must go from low to high resolution, got {res}")
        if (self.conditioning == "text") != (self.model in TEXT_MODELS):
            raise ValueError(
                f"conditioning: {self.conditioning} does not fit model {self.model!r}: "
                f"text conditioning needs a text model ({', '.join(sorted(TEXT_MODELS))}) and those need it"
            )
        for lever in ("routing", "masking", "repa"):
            if getattr(self, lever) is not None and self.model not in TRANSFORMERS:
                raise ValueError(f"train.{lever} works on a DiT's tokens; model {self.model!r} is a UNet")
        if self.routing is not None and self.masking is not None:
            if self.masking.mixer_blocks > self.routing.start_block:
                raise ValueError(
                    f"train.masking.mixer_blocks {self.masking.mixer_blocks} falls after train.routing.start_block "
                    f"{self.routing.start_block}: the drop must come before the routed span"
                )
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("train.lora trains under ZeRO 0-2: set train.zero_stage (finetune.overrides) to 2")
        if self.dpo is not None and self.lineage is None:
            raise ValueError("train.dpo aligns a trained model: it needs train.lineage (run `sfumato align`)")
        if self.dpo is not None and self.zero_stage == 3:
            raise ValueError("train.dpo keeps a whole reference copy beside the policy: use ZeRO 0-2")
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def effective_batch(self, stage: StageConfig) -> int:
        """Images per optimizer step: micro batch x accumulation x data-parallel workers."""
        return stage.micro_batch_size * self.grad_accum_steps * self.num_workers

    @property
    def mean_effective_batch(self) -> float:
        """Images per optimizer step averaged over the run's steps (stages may differ)."""
        return sum(self.effective_batch(s) * s.steps for s in self.stages) / self.total_steps
