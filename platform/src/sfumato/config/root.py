"""The root of the tree, `Config`: one run's sections and the checks that span several of them
(samplers that fit the objective, stages that have shards, buckets that fit the model, a sweep's
proxy), plus the two small run-wide sections, `ray` and `pipeline`."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from sfumato.config.base import Frozen
from sfumato.config.data import DataConfig
from sfumato.config.diffusion import DiffusionConfig
from sfumato.config.evaluate import EvaluateConfig
from sfumato.config.export import ExportConfig
from sfumato.config.posttrain import AlignConfig, FinetuneConfig
from sfumato.config.train import TrainConfig
from sfumato.config.tune import TuneConfig, check_sweep
from sfumato.models.names import SIZE_DIVISOR_PX


class RayConfig(Frozen):
    address: str | None = None
    """Cluster to attach to. None: $RAY_ADDRESS when set (as under `ray job submit`), else a
    local Ray started on demand."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local Ray (None: all of this machine's). Ignored when attaching to a cluster."""


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
        quality = (tree.get("train") or {}).get("quality")
        if isinstance(quality, dict):  # train.quality draws with a sampler too
            tree["train"]["quality"] = {"sampler": "flow-euler", **quality}
        return tree

    @model_validator(mode="after")
    def _samplers_fit_objective(self) -> Config:
        flow = self.diffusion.objective == "flow"
        used = {"evaluate.sampler": self.evaluate.sampler, "export.sampler": self.export.sampler}
        if self.train is not None:
            used["train.sample.sampler"] = self.train.sample.sampler
            if self.train.quality is not None:
                used["train.quality.sampler"] = self.train.quality.sampler
        for key, name in used.items():
            if name.startswith("flow-") != flow:
                fits = "flow-euler or flow-heun" if flow else "ddpm, ddim or dpm-solver++"
                raise ValueError(
                    f"{key}={name} does not fit diffusion.objective={self.diffusion.objective}: use {fits}"
                )
        return self

    @model_validator(mode="after")
    def _pipeline_stages_have_sections(self) -> Config:
        if self.pipeline.tune and (self.tune is None or self.train is None):
            raise ValueError("pipeline.tune needs a `tune` and a `train` section")
        if self.pipeline.finetune and (self.finetune is None or self.train is None):
            raise ValueError("pipeline.finetune needs a `finetune` and a `train` section")
        if self.pipeline.align and (self.align is None or self.train is None):
            raise ValueError("pipeline.align needs an `align` and a `train` section")
        return self

    @model_validator(mode="after")
    def _train_resolutions_have_shards(self) -> Config:
        if self.train is not None:
            missing = [
                s.resolution_px for s in self.train.stages if s.resolution_px not in self.data.shards.resolutions_px
            ]
            if missing:
                raise ValueError(
                    f"train.stages use {missing} px, which data.shards.resolutions_px "
                    f"{self.data.shards.resolutions_px} does not produce"
                )
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
    def _repa_reads_images(self) -> Config:
        if self.train is not None and self.train.repa is not None and self.train.vae is not None:
            if self.data.cache.enabled:
                raise ValueError(
                    "train.repa with train.vae needs data.cache.enabled: false (REPA's encoder reads the clean "
                    "images; the latent cache holds only their latents)"
                )
        return self

    @model_validator(mode="after")
    def _buckets_fit_the_model(self) -> Config:
        buckets = self.data.shards.buckets
        ratio = None if self.train is None else self.train.sample.aspect_ratio
        if ratio is not None and (
            buckets is None or all(abs(math.log(ratio / r)) > 0.01 for r in buckets.aspect_ratios)
        ):
            allowed = "set data.shards.buckets first" if buckets is None else f"one of {buckets.aspect_ratios}"
            raise ValueError(f"train.sample.aspect_ratio={ratio} is not a trained bucket's: {allowed}")
        if self.train is None or buckets is None:
            return self
        if self.train.vae is not None and self.data.cache.enabled:
            raise ValueError(
                "data.shards.buckets with train.vae needs data.cache.enabled: false (the latent cache "
                "stores square crops; the VAE then encodes each bucket's batch as it trains)"
            )
        # A latent model's divisor is in latent pixels: times 8, the factor of every SD-family VAE.
        needed = SIZE_DIVISOR_PX[self.train.model] * (8 if self.train.vae is not None else 1)
        if buckets.multiple_px % needed:
            space = " in latent space (times the VAE's 8)" if self.train.vae is not None else ""
            raise ValueError(
                f"data.shards.buckets.multiple_px={buckets.multiple_px} is not a multiple of {needed}, "
                f"which model {self.train.model}{space} needs for every side"
            )
        return self

    @model_validator(mode="after")
    def _tune_proxy_and_space(self) -> Config:
        if self.tune is not None:
            check_sweep(self)
        return self
