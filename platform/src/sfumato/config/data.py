"""The `data` section: sources, ingest, curation (CLIP, dedup, captions, safety), shards and
the loader, and the latent/text cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sfumato.config.base import Frozen, _absolute, _existing

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
    mode: Literal["shapes", "scenes"] = "shapes"
    """shapes: one shape on a two-colour ground (the class pilot's data); scenes: the
    compositional world of 1 to 4 shapes whose captions cover GenEval's tasks (the text pilot's,
    sfumato.data.scenes), with each scene's objects and boxes in demo/<name>/scenes.jsonl."""
    held_out: list[str] = []
    """scenes: combinations never drawn in training, e.g. "purple star" (a colour and a shape) or
    "three squares" (a count and a shape); the compositional yardstick asks for them apart."""

    @field_validator("held_out")
    @classmethod
    def _held_out(cls, value: list[str]) -> list[str]:
        from sfumato.world import parse_held_out

        for entry in value:
            parse_held_out(entry)
        return value

    @model_validator(mode="after")
    def _scenes_only(self) -> DemoSource:
        if self.held_out and self.mode != "scenes":
            raise ValueError("held_out is for mode: scenes (the shapes mode has no combinations to hold out)")
        return self


Source = Annotated[FolderSource | TableSource | WebDatasetSource | DemoSource, Field(discriminator="kind")]
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
            size = (
                max(m, round(resolution_px * ratio**0.5 / m) * m),
                max(m, round(resolution_px / ratio**0.5 / m) * m),
            )
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
    def _buckets_fit(self) -> ShardsConfig:
        if self.buckets is None:
            return self
        if self.resize_mode != "center_crop":
            raise ValueError("resize_mode: shorter_side and buckets exclude each other (buckets set the sizes)")
        odd = [r for r in self.resolutions_px if r % self.buckets.multiple_px]
        if odd:
            raise ValueError(
                f"resolutions_px {odd} are not multiples of buckets.multiple_px={self.buckets.multiple_px} "
                "(the square bucket of a resolution is the resolution itself)"
            )
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
    unsafe_prompts: list[str] = Field(
        ["an explicit nude photo", "pornographic content", "a sexually explicit image", "graphic violence and gore"],
        min_length=1,
    )
    safe_prompts: list[str] = Field(
        ["a photo", "a safe for work image", "a landscape", "an everyday scene"], min_length=1
    )
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
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            unset = ", ".join(f"sources.{i}.weight" for i, w in enumerate(weighted) if not w)
            raise ValueError(
                f"{unset} unset while other sources have a weight: set a weight on every source or on none"
            )
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
