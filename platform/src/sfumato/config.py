"""The typed config tree: load YAML, apply dotted overrides, validate, dump resolved.

Every component owns a small frozen model; unknown keys are errors that name their dotted path,
and values (ranges, enums, paths) are checked here, at load, never mid-run. Relative paths are
resolved against the current directory when the config is loaded, so the resolved config that a
run writes next to its outputs is unambiguous.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sfumato.layout import RunFolder, atomic_write
from sfumato.models.names import DIT, MODEL_FAMILIES, SIZE_DIVISOR_PX, TEXT_MODELS


class ConfigError(ValueError):
    """A config problem, phrased with the dotted key (and file) that caused it."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(os.path.abspath(os.path.expanduser(path)))


_CHECK_INPUT_PATHS: ContextVar[bool] = ContextVar("check_input_paths", default=True)


def _existing(path: Path | None, what: str) -> Path | None:
    """Absolute `path`, checked to be an existing folder, file or either (`what`), unless the
    config is a finished run's, loaded for its outputs (`load_config(..., inputs=False)`)."""
    path = _absolute(path)
    checks = {"folder": Path.is_dir, "file": Path.is_file, "path": Path.exists}
    if path is not None and _CHECK_INPUT_PATHS.get() and not checks[what](path):
        raise ValueError(f"{what} {path} does not exist")
    return path


# --------------------------------------------------------------------------------------- ray
class RayConfig(Frozen):
    address: str | None = None
    """Cluster to attach to. None: $RAY_ADDRESS when set (as under `ray job submit`), else a
    local Ray started on demand."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local Ray (None: all of this machine's). Ignored when attaching to a cluster."""


# ----------------------------------------------------------------------------------- sources
SOURCE_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class _Source(Frozen):
    name: str = Field(pattern=SOURCE_NAME)
    """Recorded as `source` on every row it yields; unique among sources."""
    license: str | None = None
    """Default licence for rows that do not carry their own; None: such rows are rejected."""
    weight: float | None = Field(None, ge=0)
    """This source's share of the training draws (normalised over the sources; 0: not trained
    on), whatever its size: e.g. 9 and 1 for 90% real photos, 10% synthetic. Set on every source
    or on none (None: no mixture, every sample once per epoch whatever its source)."""


class FolderSource(_Source):
    """An image folder; class subfolders become tags and, through the template, captions."""

    kind: Literal["folder"]
    path: Path
    caption_template: str | None = "a photo of a {tag}"
    """Caption from the innermost class folder name ('{tag}', underscores read as spaces).
    None: no caption."""

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        return _existing(value, "folder")


class TableSource(_Source):
    """A CSV or parquet table of local paths or HTTP(S) URLs with optional metadata columns."""

    kind: Literal["table"]
    path: Path
    root: Path | None = None
    """Base folder of relative paths in the table (None: the table's folder). Local paths that
    resolve outside it are rejected."""
    path_column: str = "path"
    id_column: str | None = "id"
    caption_column: str | None = "caption"
    license_column: str | None = "license"
    source_column: str | None = "source"
    """A per-row provenance string (e.g. the page a URL came from), kept as `origin`."""
    tags_column: str | None = "tags"
    """Tags as a list (parquet) or a '|'-separated string (CSV)."""

    @field_validator("path")
    @classmethod
    def _table_exists(cls, value: Path) -> Path:
        if value.suffix.lower() not in (".csv", ".parquet"):
            raise ValueError(f"table {value} must end in .csv or .parquet")
        return _existing(value, "file")

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path | None) -> Path | None:
        return _existing(value, "folder")


class WebDatasetSource(_Source):
    """Existing WebDataset tars: one sample per key, the image plus optional .txt / .json."""

    kind: Literal["webdataset"]
    path: Path
    """A .tar file or a folder of them."""

    @field_validator("path")
    @classmethod
    def _tars_exist(cls, value: Path) -> Path:
        return _existing(value, "path")


class DemoSource(_Source):
    """Captioned procedural shapes that the project draws itself: no download, known licence."""

    kind: Literal["demo"]
    license: str | None = "CC0-1.0"
    num_images: int = Field(2000, ge=1, le=1_000_000)
    image_size_px: int = Field(96, ge=16, le=1024)
    seed: int = 0


Source = Annotated[
    Union[FolderSource, TableSource, WebDatasetSource, DemoSource], Field(discriminator="kind")
]
SOURCE_KINDS = ("folder", "table", "webdataset", "demo")

# ------------------------------------------------------------------------------------ ingest
ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]


class DownloadConfig(Frozen):
    timeout_s: float = Field(10.0, gt=0)
    """Connect and per-read timeout of one HTTP attempt."""
    max_retries: int = Field(3, ge=0, le=20)
    """Retries after the first attempt, for timeouts, connection errors, 429 and 5xx."""
    backoff_s: float = Field(0.5, ge=0)
    """First retry delay; doubles on each retry (with up to 25% jitter)."""
    per_host_requests_per_s: float = Field(10.0, gt=0)
    """Request rate towards any one host from one ingest worker."""
    max_bytes: int = Field(32 * 2**20, ge=1)
    """Size cap of one download; larger bodies are cut off and rejected."""
    threads_per_worker: int = Field(16, ge=1, le=256)


class IngestConfig(Frozen):
    allowed_formats: list[ImageFormat] = ["JPEG", "PNG", "WEBP"]
    """Formats accepted, by the decoder's reading of the bytes, never by file extension."""
    max_file_bytes: int = Field(64 * 2**20, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    """Width x height read from the header; above it the file is rejected as a decompression
    bomb before any pixel is decoded."""
    min_side_px: int = Field(64, ge=1)
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    license_allowlist: list[str] = Field(min_length=1)
    """Accepted licences, compared case-insensitively."""
    batch_size: int = Field(256, ge=1)
    """Rows per call of an ingest task: larger batches amortise Ray's per-task overhead."""
    num_workers: int | None = Field(None, ge=1)
    """A cap on concurrent ingest tasks. None (the fast default): one task per free CPU of the
    cluster, the next ones queued at Ray's scheduler so no process waits between tasks; a cap
    makes each process wait for Ray Data to hand it the next task (0.1-0.2 s per task here,
    BENCHMARKS.md, ingest)."""
    download: DownloadConfig = DownloadConfig()

    @field_validator("allowed_formats")
    @classmethod
    def _some_format(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one format must be allowed")
        return value


# ------------------------------------------------------------------------------------ shards
class BucketsConfig(Frozen):
    """Aspect-ratio buckets (as NovelAI and SDXL train): per resolution R, one (width, height)
    per aspect ratio with about R x R pixels; each image is stored at its nearest bucket (by log
    aspect ratio: resized to cover it, then centre-cropped by a few per cent), and every
    micro-batch holds one bucket's images."""

    aspect_ratios: list[float] = [1 / 2, 9 / 16, 2 / 3, 3 / 4, 4 / 5, 1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0]
    """Width / height of each bucket; 1.0 must be one (sample grids and requests without a size are
    square). The defaults, the common photo and screen shapes, cut at most ~11% of an image's long
    side (less where a low resolution rounds two of them to one size)."""
    multiple_px: int = Field(8, ge=1)
    """Bucket sides are multiples of this: of what the model needs (a UNet 2^(levels-1), a DiT its
    patch, each times the VAE's factor in latent mode; checked against train.model)."""

    @field_validator("aspect_ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if any(not 0.25 <= r <= 4.0 for r in value):
            raise ValueError(f"aspect ratios must lie in 0.25..4, got {value}")
        if 1.0 not in value:
            raise ValueError(f"the aspect ratios {value} must include 1.0 (the square bucket)")
        return sorted(set(value))

    def sizes(self, resolution_px: int) -> list[tuple[int, int]]:
        """The (width, height) buckets at one resolution, narrowest first (ratios that round to
        the same size at a low resolution give one bucket)."""
        m, found = self.multiple_px, []
        for ratio in self.aspect_ratios:
            size = (max(m, round(resolution_px * ratio ** 0.5 / m) * m), max(m, round(resolution_px / ratio ** 0.5 / m) * m))
            if size not in found:
                found.append(size)
        return found


class ShardsConfig(Frozen):
    resolutions_px: list[int] = Field([64], min_length=1)
    """One set of shards per resolution (a training curriculum goes low to high)."""
    resize_mode: Literal["center_crop", "shorter_side"] = "center_crop"
    """center_crop: square crops of the resolution; shorter_side: aspect kept, the shorter side
    scaled to the resolution (the trainer crops)."""
    image_format: Literal["png", "jpeg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(1000, ge=1)
    allow_hflip: bool = True
    """Recorded with every sample: whether training may mirror it (off for text, logos)."""
    num_workers: int | None = Field(None, ge=1)
    """A cap on concurrent shard-writing tasks (None: every free CPU; see ingest.num_workers)."""
    buckets: BucketsConfig | None = None
    """Set: images keep their aspect ratio, stored at their nearest aspect bucket of each
    resolution (instead of resize_mode's square crop). None: every image square."""

    @model_validator(mode="after")
    def _buckets_fit(self) -> "ShardsConfig":
        if self.buckets is None:
            return self
        if self.resize_mode != "center_crop":
            raise ValueError("resize_mode: shorter_side and buckets exclude each other (buckets set the sizes)")
        odd = [r for r in self.resolutions_px if r % self.buckets.multiple_px]
        if odd:
            raise ValueError(f"resolutions_px {odd} are not multiples of buckets.multiple_px={self.buckets.multiple_px} "
                             "(the square bucket of a resolution is the resolution itself)")
        return self

    def bucket_sizes(self, resolution_px: int) -> list[tuple[int, int]] | None:
        """The (width, height) buckets of one resolution; None without buckets."""
        return None if self.buckets is None else self.buckets.sizes(resolution_px)

    @field_validator("resolutions_px")
    @classmethod
    def _resolutions(cls, value: list[int]) -> list[int]:
        for res in value:
            if not 8 <= res <= 4096:
                raise ValueError(f"resolution {res} is outside 8..4096 px")
        if len(set(value)) != len(value):
            raise ValueError(f"resolutions repeat: {value}")
        return sorted(value)


class LoaderConfig(Frozen):
    batch_size: int = Field(64, ge=1)
    resolution_px: int | None = None
    """Which shard set to stream (None: the lowest)."""
    smoke_batches: int = Field(20, ge=1)
    """Batches that `sfumato dataloader` streams to measure samples/s."""


class ClipConfig(Frozen):
    model: str | None = None
    """Hub id or local folder of a transformers CLIPModel with its processor and tokenizer
    (OpenAI CLIP, or LAION OpenCLIP weights in transformers format), safetensors only, e.g.
    openai/clip-vit-base-patch32. None: no embeddings (and so no near-duplicate removal)."""
    batch_size: int = Field(32, ge=1)
    num_workers: int | None = Field(None, ge=1)
    """Actors, each holding one copy of the model; None: one per CPU (or GPU with num_gpus)."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per actor on a cluster (0: CPU actors)."""


class DedupConfig(Frozen):
    threshold: float = Field(0.95, gt=0, le=1)
    """Cosine similarity at or above which two images are near-duplicates."""
    exact_max: int = Field(50_000, ge=0)
    """Up to this many images the search is exact (FAISS IndexFlatIP); above, IVF."""
    nlist: int | None = Field(None, ge=1)
    nprobe: int = Field(16, ge=1)
    license_preference: list[str] = []
    """Keeper rule: most pixels, then the licence listed first here (unlisted last), then id."""


class CaptionConfig(Frozen):
    mode: Literal["keep", "fill", "replace"] = "keep"
    """keep: the sources' captions; fill: caption rows without one; replace: caption every row."""
    model: str | None = None
    """Hub id or local folder of a transformers image-to-text model (safetensors), e.g.
    Salesforce/blip-image-captioning-base (BLIP) or a VLM; needed by fill and replace."""
    prompt: str | None = None
    """Conditional captioning: the text the caption continues (e.g. "a photograph of")."""
    trigger: str | None = None
    """A token prepended to every final caption (e.g. a style or subject trigger word)."""
    max_new_tokens: int = Field(30, ge=1, le=512)
    batch_size: int = Field(8, ge=1)
    num_workers: int | None = Field(None, ge=1)
    num_gpus: float = Field(0, ge=0)


class SafetyConfig(Frozen):
    nsfw_threshold: float = Field(0.5, ge=0, le=1)
    """Zero-shot NSFW probability (unsafe prompts' share) at or above which nsfw_flag is set."""
    drop_nsfw: bool = True
    """Flagged rows get status `unsafe` and stay out of the shards."""
    unsafe_prompts: list[str] = Field(["an explicit nude photo", "pornographic content", "a sexually explicit image",
                                       "graphic violence and gore"], min_length=1)
    safe_prompts: list[str] = Field(["a photo", "a safe for work image", "a landscape", "an everyday scene"],
                                    min_length=1)
    aesthetic_weights: Path | None = None
    """A safetensors file of an MLP head on the CLIP embedding (layers.<k>.weight/bias, ReLU
    between); None: no aesthetic score."""
    min_aesthetic: float | None = None
    """Rows scoring below get status `low_aesthetic` (needs aesthetic_weights)."""

    @field_validator("aesthetic_weights")
    @classmethod
    def _weights_exist(cls, value: Path | None) -> Path | None:
        return _existing(value, "file")


class CurateConfig(Frozen):
    clip: ClipConfig = ClipConfig()
    dedup: DedupConfig = DedupConfig()
    caption: CaptionConfig = CaptionConfig()
    safety: SafetyConfig = SafetyConfig()


class CacheConfig(Frozen):
    """The cache (`sfumato cache`, sfumato.models.cache): the shards' images encoded once by the
    run's frozen VAE (train.vae), the posterior's mean and std per sample, and for a frozen
    pretrained text encoder (train.text.train_encoder: false) each caption's encoder states;
    reused by every run and sweep on the same shards with the same models, so training runs
    neither encoder."""

    enabled: bool = True
    """Build it (runs with train.vae or a frozen text encoder) and train from it when it is
    complete; False: every run encodes on the fly."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage: float16 halves the bytes per sample (the draw is made in float32)."""
    batch_size: int = Field(32, ge=1)
    """Images per VAE forward in the builder."""
    num_workers: int | None = Field(None, ge=1)
    """Builder actors, each holding the encoders; None: one per CPU (or GPU with num_gpus), at most one per shard."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per builder actor on a cluster (0: CPU actors)."""


class DataConfig(Frozen):
    output_dir: Path
    """Holds manifest.parquet, rejects.parquet, blobs/ and shards/<res>/."""
    sources: list[Source] = Field(min_length=1)
    ingest: IngestConfig
    shards: ShardsConfig = ShardsConfig()
    loader: LoaderConfig = LoaderConfig()
    curate: CurateConfig = CurateConfig()
    cache: CacheConfig = CacheConfig()

    @field_validator("output_dir")
    @classmethod
    def _abs(cls, value: Path) -> Path:
        return _absolute(value)

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            unset = ", ".join(f"sources.{i}.weight" for i, w in enumerate(weighted) if not w)
            raise ValueError(f"{unset} unset while other sources have a weight: set a weight on every source or on none")
        if any(weighted) and not any(s.weight for s in self.sources):
            raise ValueError("sources.*.weight are all 0: at least one source needs a positive weight")
        if self.loader.resolution_px not in (None, *self.shards.resolutions_px):
            raise ValueError(
                f"loader.resolution_px={self.loader.resolution_px} is not one of "
                f"shards.resolutions_px={self.shards.resolutions_px}"
            )
        return self

    @property
    def source_weights(self) -> dict[str, float] | None:
        """Source name -> share of the training draws (summing to 1), or None without weights."""
        if self.sources[0].weight is None:
            return None
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


# --------------------------------------------------------------------------------- diffusion
class FlowConfig(Frozen):
    """Rectified flow (diffusion.objective: flow): x_t = (1 - t) x_0 + t eps, the network predicts
    the velocity eps - x_0 (Liu et al. 2022; Lipman et al. 2022), as SD3 and Flux train."""

    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    """How training draws t in (0, 1): uniform, or logit-normal (t = sigmoid(n), n ~ N(mean, std)),
    which puts more of the training on the middle of the path (Esser et al. 2024, SD3, sec. 3.1:
    rf/lognorm(0.00, 1.00) ranked best)."""
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0)
    """Time shift t' = s t / (1 + (s - 1) t) applied to training times and sampling steps alike:
    s > 1 spends more of both at high noise (SD3 uses 3.0 at 1024 px)."""
    shift_base_px: int | None = Field(None, ge=8)
    """Set: the shift is resolution-dependent, shift x resolution_px / shift_base_px (SD3,
    sec. 5.3.2: sqrt(m / n) for m and n pixels), so a curriculum's larger stages see more noise.
    None: `shift` at every resolution."""

    def shift_at(self, resolution_px: int) -> float:
        """The time shift at an image resolution (pixels, also for latent runs)."""
        return self.shift if self.shift_base_px is None else self.shift * resolution_px / self.shift_base_px


class DiffusionConfig(Frozen):
    objective: Literal["ddpm", "flow"] = "ddpm"
    """ddpm: discrete-time diffusion with the noise schedule and prediction type below (Min-SNR);
    flow: rectified flow matching (`flow`), sampled with flow-euler or flow-heun."""
    flow: FlowConfig = FlowConfig()
    num_train_timesteps: int = Field(1000, ge=2, le=100_000)
    """DDPM: discrete timesteps; flow: the scale of the network's time input (t x this, as
    diffusers' FlowMatchEulerDiscreteScheduler feeds it)."""
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "cosine"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float | None = Field(5.0, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE."""
    noise_offset: float = Field(0.0, ge=0, le=1)
    zero_terminal_snr: bool = False
    """Rescale the schedule so the last step is pure noise (Lin et al. 2023); needs v-prediction."""
    condition_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of dropping a sample's caption/class, for classifier-free guidance."""

    @model_validator(mode="after")
    def _consistent(self) -> "DiffusionConfig":
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type: v_prediction (epsilon is "
                             "undefined at SNR 0)")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start={self.beta_start} must be below beta_end={self.beta_end}")
        return self


# ------------------------------------------------------------------------------------- train
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

    pretrained: str | None = None
    """Hub id or local folder of a CLIP text encoder and its tokenizer (safetensors weights),
    e.g. openai/clip-vit-large-patch14. None: from scratch, a BPE tokenizer trained on the
    manifest's captions and a randomly initialised CLIPTextModel of the size below."""
    encoder_subfolder: str | None = None
    """Where the encoder sits inside `pretrained` (e.g. text_encoder in a Stable Diffusion repo)."""
    tokenizer_subfolder: str | None = None
    train_encoder: bool = True
    """Train the encoder jointly (always, from scratch); False freezes a pretrained one."""
    max_length: int = Field(32, ge=4, le=512)
    """Tokens per caption, start and end tokens included; longer captions are truncated."""
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    """From scratch: the BPE vocabulary, of which the 256 byte tokens and 3 special tokens come first."""
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "TextConfig":
        if self.pretrained is None and not self.train_encoder:
            raise ValueError("train_encoder: false needs a pretrained encoder (a random one would stay random)")
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
    def _one(self) -> "EMAConfig":
        if (self.decay is None) == (self.halflife_samples is None):
            raise ValueError("set exactly one of ema.decay and ema.halflife_samples")
        return self


Sampler = Literal["ddpm", "ddim", "dpm-solver++", "flow-euler", "flow-heun"]
"""DDPM runs: diffusers' DDPMScheduler, DDIMScheduler (eta 0) and DPMSolverMultistepScheduler
(DPM-Solver++, Lu et al. 2022, order 2) on the run's noise schedule. Flow runs: Euler or Heun
(2nd order) along the learnt velocity, diffusers' FlowMatchEuler/HeunDiscreteScheduler.
sfumato.diffusion.sample.SAMPLERS; a run's sampler must fit its objective."""


class SampleConfig(Frozen):
    """The fixed-seed grids written while training (EMA weights): image i always starts from
    seed + i, so grids of two steps differ only by the weights."""

    num_images: int = Field(16, ge=1, le=256)
    seed: int = 0
    steps: int = Field(50, ge=1, le=1000)
    sampler: Sampler = "ddim"
    guidance_scale: float = Field(1.0, ge=0, le=50)
    """Classifier-free guidance (1: none) for class- and text-conditional models."""
    prompts: list[str] | None = Field(None, min_length=1)
    """Text-conditional runs: the grid's captions, cycled. None: the manifest's most frequent
    captions, chosen at the run's first start and kept in text/sample_prompts.json."""
    aspect_ratio: float | None = None
    """With data.shards.buckets: the grid's images at each stage's bucket of this width / height
    (one of the buckets' aspect_ratios, within 1%). None: square, at the stage's resolution."""


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


# ----------------------------------------------------------------------------- post-training
class SelectConfig(Frozen):
    """finetune.select: the manifest rows a fine-tune trains and validates on. Every key that is
    set must hold; only `ok` rows are in the shards, so only they can be selected. A filter that
    selects nothing is an error naming its key, before any work."""

    tags: list[str] | None = Field(None, min_length=1)
    """Rows with any of these tags (a sample's class is its innermost tag)."""
    sources: list[str] | None = Field(None, min_length=1)
    """Rows of these data.sources names."""
    caption_contains: str | None = Field(None, min_length=1)
    """Rows whose caption contains this text, case-insensitive ("on a blue background")."""
    min_aesthetic: float | None = None
    """Rows whose aesthetic_score (data.curate.safety.aesthetic_weights) is at least this."""
    ids: list[str] | None = Field(None, min_length=1)
    """An explicit list of manifest ids (with ids_file: both lists)."""
    ids_file: Path | None = None
    """A text file of manifest ids, one a line."""

    @field_validator("ids_file")
    @classmethod
    def _abs(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)


class LoraSection(Frozen):
    """LoRA adapters (peft) instead of full fine-tuning: only their weights train, go into the
    optimizer, the EMA and the checkpoints; `sfumato export` writes the adapter alone (diffusers'
    LoRA format) and the merged model."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)
    """The adapter's update is scaled by alpha / rank; None: alpha = rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)
    """peft target names (module names or their last components, e.g. [to_q, to_k, to_v, to_out.0]);
    None: every linear layer of the network (attention, feed-forward, time and class embeddings)."""
    conv: bool = False
    """With target_modules None: the convolutions too (all but the first and the last)."""
    text_encoder: bool = False
    """Text models: adapters on the text encoder's attention too."""
    learning_rate: float | None = Field(None, gt=0)
    """finetune.lora only: the fine-tune's train.optimizer.lr when it trains adapters (they want a
    higher rate than full weights: a rank-r update starts at zero and moves through a small
    subspace; kohya and diffusers' LoRA scripts use ~10x the full fine-tuning rate). None: the rate
    the overrides give. Resolved into train.optimizer.lr; the run's train.lora keeps None."""


class LineageConfig(Frozen):
    """train.lineage: where a post-training run starts. Set by `sfumato finetune` (resolved from the
    finetune section), never by hand; None: a run from fresh weights."""

    parent: Path | None = None
    """The parent run folder whose EMA weights the run starts from."""
    checkpoint: str | None = None
    parent_step: int | None = None
    parent_config_sha256: str | None = None
    pretrained: str | None = None
    """Or: a diffusers folder or hub id of a model family sfumato trains."""
    select: dict[str, Any] = {}
    """The finetune.select filter the run's data came from (selected_ids.txt in the run folder)."""
    selected_rows: int = Field(0, ge=0)
    """Rows the filter selected (0: an alignment, whose data are its pairs)."""
    pairs: Path | None = None
    """An alignment's preference pairs (align.pairs) and their SHA-256."""
    pairs_sha256: str | None = None
    pair_count: int | None = None

    @model_validator(mode="after")
    def _one_start(self) -> "LineageConfig":
        if (self.parent is None) == (self.pretrained is None):
            raise ValueError("a lineage starts from exactly one of parent and pretrained")
        return self


class FinetuneConfig(Frozen):
    """`sfumato finetune` (and the pipeline's finetune stage): supervised fine-tuning of a trained
    model on a selected subset, fully or with LoRA. The fine-tune is the run of this config with
    `overrides` applied (dotted keys, like tune.proxy): its own output_dir, learning rate, warm-up,
    steps; the EMA restarts from the parent's weights."""

    parent: Path | None = None
    """A run folder to start from (its EMA weights); None (and no pretrained): train.output_dir,
    the run this config trains."""
    checkpoint: str | None = None
    """The parent's checkpoint, e.g. step-00001200; None: its newest."""
    pretrained: str | None = None
    """Instead of a parent: a diffusers folder (an `sfumato export`) or hub id of a model family
    sfumato trains."""
    select: SelectConfig = SelectConfig()
    lora: LoraSection | None = None
    """None: every weight trains (full fine-tuning)."""
    overrides: dict[str, Any] = Field(min_length=1)
    """Dotted keys applied to this config for the fine-tune; train.output_dir is required."""

    @field_validator("parent")
    @classmethod
    def _abs(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)

    @model_validator(mode="after")
    def _own_folder(self) -> "FinetuneConfig":
        if "train.output_dir" not in self.overrides:
            raise ValueError("finetune.overrides must set train.output_dir (the fine-tune's own run folder)")
        if self.parent is not None and self.pretrained is not None:
            raise ValueError("give finetune.parent or finetune.pretrained, not both")
        return self


class AlignConfig(Frozen):
    """`sfumato align` (and the pipeline's align stage): Diffusion-DPO (Wallace et al. 2023) of a
    trained model on preference pairs (`sfumato pairs` writes them from A/B votes), against a
    frozen reference copy of the starting weights, fully or with LoRA. Like a fine-tune, the
    alignment is the run of this config with `overrides` applied (its own output_dir, steps,
    learning rate); it starts from the parent's EMA weights (or a diffusers export)."""

    parent: Path | None = None
    """A run folder to start from (its EMA weights; a fine-tune's, for the SFT -> DPO order);
    None (and no pretrained): train.output_dir."""
    checkpoint: str | None = None
    pretrained: str | None = None
    pairs: Path
    """A pairs table (sfumato.data.pairs: id, condition, chosen, rejected)."""
    beta: float = Field(2000.0, gt=0)
    """The KL penalty's strength against the reference, on per-pixel mean errors (diffusers'
    SD1.5 example: 2500; larger keeps the policy closer to the reference)."""
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    """Pairs held out (by a hash of their id) to measure the implicit reward accuracy on."""
    lora: LoraSection | None = None
    """None: every weight trains."""
    overrides: dict[str, Any] = Field(min_length=1)
    """Dotted keys applied to this config for the alignment; train.output_dir is required."""

    @field_validator("parent", "pairs")
    @classmethod
    def _abs(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)

    @model_validator(mode="after")
    def _own_folder(self) -> "AlignConfig":
        if "train.output_dir" not in self.overrides:
            raise ValueError("align.overrides must set train.output_dir (the alignment's own run folder)")
        if self.parent is not None and self.pretrained is not None:
            raise ValueError("give align.parent or align.pretrained, not both")
        return self


class DPOConfig(Frozen):
    """train.dpo: the run trains on preference pairs with the Diffusion-DPO loss (set from the
    align section by `sfumato align`, never by hand)."""

    pairs: Path
    beta: float = Field(gt=0)
    holdout_fraction: float = Field(0.1, ge=0, lt=1)


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
            raise ValueError("train.lora.learning_rate is not read: set finetune.lora.learning_rate (or train.optimizer.lr)")
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
    def _stages(self) -> "TrainConfig":
        res = [s.resolution_px for s in self.stages]
        if res != sorted(res):
            raise ValueError(f"curriculum stages must go from low to high resolution, got {res}")
        if (self.conditioning == "text") != (self.model in TEXT_MODELS):
            raise ValueError(f"conditioning: {self.conditioning} does not fit model {self.model!r}: "
                             "text conditioning needs a *-text-* model and those need text conditioning")
        if MODEL_FAMILIES[self.model] == DIT and len(set(res)) > 1:
            raise ValueError("a DiT's position embedding is fixed to one resolution: use one stage")
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


# ---------------------------------------------------------------------- evaluate / export
class DomainConfig(Frozen):
    """The offline yardstick (sfumato.evaluate.domain): a small CNN trained on the training shards'
    classes at the run's last resolution, once per shard set and these settings, cached under
    data.output_dir/domain_classifier/. Its penultimate features give FD-domain, its predictions the
    class accuracy of generated images. Needs no downloaded weights; its numbers compare runs on the
    same data and yardstick fingerprint only, never published FIDs."""

    enabled: bool = True
    """Off: no domain numbers. Needs classes in the data (the innermost tag, shards' classes.json)."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the shard images (by id hash) the classifier never trains on: its held-out accuracy
    (the ceiling of class accuracy) and the reference statistics of FD-domain come from them."""
    max_images: int | None = Field(10_000, ge=10)
    """Shard images read (training and held-out alike, chosen by id hash, so every class keeps its
    share). None: all of the last stage's shards."""
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0, le=1)
    """AdamW peak learning rate of a one-cycle schedule (warm-up, then cosine decay to ~0)."""
    weight_decay: float = Field(0.05, ge=0)
    width: int = Field(16, ge=4, le=512)
    """Channels of the first of four conv blocks, doubled by each next one: 8 x width features
(16: 128 features, 0.4 M parameters; 5,000 CIFAR-10 images train in about a minute on 2 CPU cores)."""
    hflip: bool = True
    """Mirror training images at random: off for data whose classes change under mirroring (digits, text)."""
    noise_images: int = Field(500, ge=2)
    """Gaussian noise images (clamped to [-1, 1], fixed seed) classified for the floor of class accuracy."""
    seed: int = 0
    """Weights' initialisation, data order, augmentation and the noise images."""


class EvaluateConfig(Frozen):
    """`sfumato evaluate RUN_DIR`: generated images against the training shards."""

    num_samples: int = Field(1000, ge=2, le=1_000_000)
    """Images generated per evaluation: 1,000 for a quick number, 10,000 for a robust one
    (FID is biased upwards at small counts; compare runs at equal counts only)."""
    batch_size: int = Field(50, ge=1)
    sampler: Sampler = "dpm-solver++"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(1.0, ge=0, le=50)
    seed: int = 0
    """Image i starts from noise seeded seed + i, for every checkpoint evaluated."""
    inception_weights: str | None = None
    """Hub id, folder or .safetensors file of pytorch-fid's Inception-v3 weights
    (pt_inception-2015-12-05): the standard FID. None: FD on CLIP image features (FD-CLIP),
    whose numbers are not comparable with FID's."""
    clip_model: str | None = None
    """transformers CLIPModel (hub id or folder) for FD-CLIP and CLIPScore; None:
    data.curate.clip.model. Without any CLIP model CLIPScore is skipped."""
    reference_max_images: int | None = Field(10_000, ge=2)
    """Training images in the reference statistics (None: all of the last stage's shards)."""
    captions: list[str] | None = Field(None, min_length=1)
    """Text-conditional runs: prompts for the generated images and CLIPScore, cycled; give
    captions held out from training here. None: the manifest's distinct captions, which the model
    trained on (the report says which were used)."""
    device: str = "cpu"
    domain: DomainConfig = DomainConfig()
    """The offline yardstick: FD-domain and class accuracy, computed whenever the data has classes."""


class ExportConfig(Frozen):
    """`sfumato export RUN_DIR`: diffusers folder, ONNX and INT8 of the EMA weights."""

    sampler: Sampler = "ddim"
    """The scheduler the diffusers folder ships with (users may swap it, the diffusers way)."""
    onnx: bool = True
    int8: bool = True
    """Also an INT8 copy (onnxruntime dynamic quantisation of the weights)."""
    onnx_opset: int = Field(18, ge=14, le=23)
    check_batch_size: int = Field(2, ge=1, le=64)
    """Batch of fixed inputs on which ONNX is compared with PyTorch."""


# -------------------------------------------------------------------------------------- tune
class Distribution(Frozen):
    """One axis of a search space: log_uniform / uniform over [low, high], or a choice of values."""

    distribution: Literal["log_uniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Distribution":
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


class PipelineConfig(Frozen):
    """`sfumato pipeline`: the optional stages of the whole job (the data stages always run, the
    curation ones when their models are configured; train and later ones when `train` is set)."""

    tune: bool = False
    """Sweep the `tune` section's proxies first and train the full run on the best config."""
    evaluate: bool = True
    """FID / FD-CLIP and CLIPScore when a feature network is configured (evaluate.inception_weights,
    evaluate.clip_model or data.curate.clip.model); the report and cards in any case."""
    export: bool = True
    align: bool = False
    """After training (and the fine-tune, when on): the `align` section's Diffusion-DPO of the run
    (of the fine-tune, when align.parent names it), then its report and export."""
    finetune: bool = False
    """After training (and its evaluation): the `finetune` section's fine-tune of the run, then its
    report and export."""


class Config(Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    ray: RayConfig = RayConfig()
    data: DataConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig | None = None
    """None: a data-only config (ingest and shards)."""
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    tune: TuneConfig | None = None
    """`sfumato tune`: the proxy and search space of a sweep over this run."""
    finetune: FinetuneConfig | None = None
    """`sfumato finetune`: a post-training run of this config's model on a selected subset."""
    align: AlignConfig | None = None
    """`sfumato align`: Diffusion-DPO of this config's model on preference pairs."""
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="before")
    @classmethod
    def _objective_samplers(cls, tree: Any) -> Any:
        """Samplers left unset get the objective's default: a flow run samples with flow-euler."""
        if not isinstance(tree, dict) or (tree.get("diffusion") or {}).get("objective") != "flow":
            return tree
        tree = dict(tree)
        for section, sub in (("train", "sample"), ("evaluate", None), ("export", None)):
            node = tree.get(section)
            if section == "train" and not isinstance(node, dict):
                continue
            node = dict(node or {})
            tree[section] = node
            if sub is not None:
                node[sub] = dict(node.get(sub) or {})
                node = node[sub]
            node.setdefault("sampler", "flow-euler")
        return tree

    @model_validator(mode="after")
    def _samplers_fit_objective(self) -> "Config":
        flow = self.diffusion.objective == "flow"
        used = {"evaluate.sampler": self.evaluate.sampler, "export.sampler": self.export.sampler}
        if self.train is not None:
            used["train.sample.sampler"] = self.train.sample.sampler
        for key, name in used.items():
            if name.startswith("flow-") != flow:
                fits = "flow-euler or flow-heun" if flow else "ddpm, ddim or dpm-solver++"
                raise ValueError(f"{key}={name} does not fit diffusion.objective={self.diffusion.objective}: use {fits}")
        return self

    @model_validator(mode="after")
    def _pipeline_stages_have_sections(self) -> "Config":
        if self.pipeline.tune and (self.tune is None or self.train is None):
            raise ValueError("pipeline.tune needs a `tune` and a `train` section")
        if self.pipeline.finetune and (self.finetune is None or self.train is None):
            raise ValueError("pipeline.finetune needs a `finetune` and a `train` section")
        if self.pipeline.align and (self.align is None or self.train is None):
            raise ValueError("pipeline.align needs an `align` and a `train` section")
        return self

    @model_validator(mode="after")
    def _train_resolutions_have_shards(self) -> "Config":
        if self.train is not None:
            missing = [s.resolution_px for s in self.train.stages if s.resolution_px not in self.data.shards.resolutions_px]
            if missing:
                raise ValueError(f"train.stages use {missing} px, which data.shards.resolutions_px "
                                 f"{self.data.shards.resolutions_px} does not produce")
        return self

    @property
    def trained_sizes_px(self) -> list[tuple[int, int]] | None:
        """The (width, height) aspect buckets of the training stages' resolutions, in pixels
        (what sample grids and the served model may be asked for); None without buckets."""
        if self.train is None or self.data.shards.buckets is None:
            return None
        sizes = [size for s in self.train.stages for size in self.data.shards.bucket_sizes(s.resolution_px)]
        return sorted(set(sizes))

    def sample_size_px(self, resolution_px: int) -> tuple[int, int]:
        """(width, height) of the training grids' images at one stage resolution."""
        ratio = self.train.sample.aspect_ratio
        if ratio is None:
            return resolution_px, resolution_px
        # The bucket that ratio became at this resolution (sides rounded to buckets.multiple_px).
        return min(self.data.shards.bucket_sizes(resolution_px), key=lambda s: abs(math.log(s[0] / s[1] / ratio)))

    @model_validator(mode="after")
    def _buckets_fit_the_model(self) -> "Config":
        buckets = self.data.shards.buckets
        ratio = None if self.train is None else self.train.sample.aspect_ratio
        if ratio is not None and (buckets is None or all(abs(math.log(ratio / r)) > 0.01 for r in buckets.aspect_ratios)):
            allowed = "set data.shards.buckets first" if buckets is None else f"one of {buckets.aspect_ratios}"
            raise ValueError(f"train.sample.aspect_ratio={ratio} is not a trained bucket's: {allowed}")
        if self.train is None or buckets is None:
            return self
        if self.train.vae is not None and self.data.cache.enabled:
            raise ValueError("data.shards.buckets with train.vae needs data.cache.enabled: false (the latent cache "
                             "stores square crops; the VAE then encodes each bucket's batch as it trains)")
        # A latent model's divisor is in latent pixels: times 8, the factor of every SD-family VAE.
        needed = SIZE_DIVISOR_PX[self.train.model] * (8 if self.train.vae is not None else 1)
        if buckets.multiple_px % needed:
            space = " in latent space (times the VAE's 8)" if self.train.vae is not None else ""
            raise ValueError(f"data.shards.buckets.multiple_px={buckets.multiple_px} is not a multiple of {needed}, "
                             f"which model {self.train.model}{space} needs for every side")
        return self

    @model_validator(mode="after")
    def _tune_proxy_and_space(self) -> "Config":
        if self.tune is not None:
            check_sweep(self)
        return self


# ------------------------------------------------------------------------------ load / dump
def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        # Drop pydantic's union tag ("sources.0.folder.path" -> "sources.0.path").
        if item in SOURCE_KINDS and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(str(item))
    return ".".join(parts)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {_dotted(e['loc']) or '<root>'}: {msg}")
    return "\n".join(lines)


def _split_key(node: Any, keys: list[str], depth: int) -> int:
    """How many dotted parts the key at `node` takes: more than one where the mapping holds a key
    with dots in it (tune.search_space.train.optimizer.lr names one entry)."""
    if isinstance(node, dict):
        for end in range(len(keys), depth + 1, -1):
            if ".".join(keys[depth:end]) in node:
                return end - depth
    return 1


def apply_override(tree: dict, dotted_key: str, value: Any) -> None:
    """Set `a.b.c=value` in a nested dict; list items are addressed by index (`sources.0`), and
    keys that hold dots themselves (search space entries) are matched whole."""
    keys = dotted_key.split(".")
    node: Any = tree
    depth = 0
    while True:
        width = _split_key(node, keys, depth)
        key, where = ".".join(keys[depth:depth + width]), ".".join(keys[:depth + width])
        if depth + width == len(keys):
            break
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted_key}: {where} is not an item of the list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted_key}: {where} is a value, not a section")
        depth += width
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError(f"override {dotted_key}: no list item {key}")
        node[int(key)] = value
    else:
        node[key] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_config(path: str | Path, overrides: list[str] | None = None, inputs: bool = True) -> Config:
    """inputs=False: the stage reads no data source (evaluate, report, export of a run folder), so
    source paths that no longer exist (a run folder copied off its cluster) are not errors."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        apply_override(tree, key, value)
    try:
        return validate_config(tree, inputs)
    except ValidationError as err:
        origin = f"{path}" + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(_format_errors(err, origin)) from None


def validate_config(tree: dict, inputs: bool | None = None) -> Config:
    """A Config from a tree (pydantic's ValidationError on bad values). inputs=False: as in
    load_config; what a Ray worker uses, since a source folder on the driver's machine need not
    exist on the worker's (workers read shards and run folders only). None: as the enclosing
    validation does (True outside any)."""
    token = _CHECK_INPUT_PATHS.set(_CHECK_INPUT_PATHS.get() if inputs is None else inputs)
    try:
        return Config.model_validate(tree)
    finally:
        _CHECK_INPUT_PATHS.reset(token)


def to_dict(config: BaseModel) -> dict:
    return config.model_dump(mode="json")


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def write_resolved(config: BaseModel, path: Path) -> Path:
    """Write the resolved config next to a stage's outputs (atomically)."""
    return atomic_write(path, dump_yaml(config))


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """A run folder's resolved config (RunFolder.config) with optional overrides: what every
    stage after training (evaluate, export, report, serve, finetune) starts from. A folder
    without config.yaml, or a config without a train section, is not a run folder."""
    folder = RunFolder(run_dir).require()
    cfg = load_config(folder.config, overrides, inputs=False)
    if cfg.train is None:
        raise ConfigError(f"{folder.config} has no `train` section: it is not a training run's config")
    return cfg


# ------------------------------------------------------------------- the sweep's proxy (tune)
# A sweep's proxy is the full run with `tune.proxy` applied; a trial is the proxy with one sample
# of `tune.search_space`. Both are config trees validated like any config (sfumato.tune.space
# builds trials and the best config from them; `check_sweep` runs when a config is loaded).

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


def validated(tree: dict, what: str, inputs: bool | None = None):
    """A Config from `tree`; a problem becomes a ValueError naming `what` and the dotted keys."""
    try:
        return validate_config(tree, inputs)
    except ValidationError as err:
        raise ValueError(_format_errors(err, what)) from None


def proxy_tree(cfg) -> dict:
    return apply(run_tree(cfg), cfg.tune.proxy)


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



def content_hash(*parts: Any) -> str:
    """A stable short hash of JSON-able parts (configs as dicts, lists of ids...)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
