"""What the model deployment runs: an exported model behind one `generate(jobs, should_stop)`.

`torch` loads the diffusers export (`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`,
safetensors only) and offers every sampler that fits the model's objective (DDPM: ddpm, ddim,
dpm-solver++; flow matching: flow-euler, flow-heun); `onnx` runs the standalone onnxruntime
sampler of the ONNX export (DDIM, or flow Euler) at the model's own size. Both take a group of
compatible jobs (same sampler, steps, guidance and its interval, size), generate all their images
in one batched denoising loop, and call `should_stop()` before every step: when it says so, the loop
stops with `Cancelled` and the replica is free again. Image k of a job with seed s always starts
from the noise of seed s + k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfumato.layout import ExportFolder


class Cancelled(Exception):
    """Every job of the group was cancelled (timeout or client gone) mid-denoise."""


@dataclass
class Job:
    id: str
    seed: int
    steps: int
    guidance_scale: float
    num_images: int
    sampler: str
    width: int
    height: int
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | str | None = None
    guidance_interval: tuple[float, float] | None = None
    """Guide only at noise levels in [lo, hi] (SfumatoPipeline.__call__); None: at every step."""
    deadline: float = float("inf")
    """time.time() after which nobody waits for the result any more."""
    created: float = 0.0
    """time.time() when the request arrived (its queue wait is measured from it)."""
    model: str | None = None
    """One of the served models or adapters by name (ServeSettings.model_name, models,
    adapters); None: the base."""

    def group_key(self) -> tuple:
        """Jobs with equal keys share one denoising loop."""
        return (
            self.model,
            self.sampler,
            self.steps,
            self.guidance_scale,
            self.guidance_interval,
            self.width,
            self.height,
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    conditioning: str
    """none | class | text"""
    class_names: list[str]
    samplers: list[str]
    """The samplers that fit the model's objective; a request naming another is a 422."""
    default_size_px: int
    size_multiple_px: int
    """Sizes are multiples of this; 0: only default_size_px."""
    trained_sizes_px: tuple[tuple[int, int], ...] = ()
    """(width, height) aspect buckets the model was trained at; set: the only sizes served."""
    guidance_scale: float = 1.0
    """A request's guidance when it names none: the run's own (its evaluate.guidance_scale, in
    the export's sfumato.json); 1 for unconditional models and exports that do not record it."""
    guidance_interval: tuple[float, float] | None = None
    """Likewise the run's evaluate.guidance_interval; None: guidance at every step."""

    @property
    def default_sampler(self) -> str:
        """A request's sampler when it names none: DPM-Solver++ where offered (good at few steps), else the first."""
        return "dpm-solver++" if "dpm-solver++" in self.samplers else self.samplers[0]


def _stepper(should_stop):
    def callback(step_index, t):
        if should_stop():
            raise Cancelled(f"cancelled before step {step_index}")

    return callback


class TorchBackend:
    def __init__(
        self, export_dir: Path, device: str = "cpu", lora: Path | None = None, adapters: dict[str, Path] | None = None
    ):
        """`lora`: one adapter fused into the weights. `adapters`: named adapters loaded beside
        each other and not fused (diffusers' multi-adapter LoRA); a job naming one runs with it
        alone active, any other job with none."""
        import torch
        from diffusers import DiffusionPipeline

        self.torch = torch
        folder = ExportFolder(export_dir).diffusers
        if not ExportFolder(export_dir).diffusers_index.exists():
            raise FileNotFoundError(
                f"{folder} holds no diffusers export (model_index.json): run `sfumato export` first"
            )
        self.pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.meta = _meta(ExportFolder(export_dir).meta)
        if lora is not None:  # a LoRA run's adapter (its export's lora/) onto this base, fused once
            _check_adapter(lora)
            self.pipe.load_lora_weights(str(lora))
            self.pipe.fuse_lora()
            self.meta = {**self.meta, "lora": str(lora)}
        self.adapters = dict(adapters or {})
        for name, folder in self.adapters.items():
            _check_adapter(folder)
            self.pipe.load_lora_weights(str(folder), adapter_name=name)
        self._active: str | None = None
        if self.adapters:
            self.pipe.disable_lora()
        self._pipes = {}

    def _activate(self, adapter: str | None) -> None:
        """Only this adapter on (None: none), switched only when it changes."""
        if adapter == self._active:
            return
        if adapter is None:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([adapter])
        self._active = adapter

    def info(self) -> ModelInfo:
        from sfumato.diffusion.sample import DDPM_SAMPLERS, FLOW_SAMPLERS, is_flow

        p = self.pipe
        conditioning = "text" if p.text_encoder is not None else ("class" if p.num_classes else "none")
        dit = "DiT" in type(p.unet).__name__
        trained = tuple(tuple(size) for size in self.meta.get("sizes_px", ()))
        if dit:  # any trained bucket (a grid of whole patches), else its training size alone
            multiple = p.vae_scale_factor * p.unet.config.patch_size if trained else 0
        else:
            multiple = p.vae_scale_factor * 2 ** (len(p.unet.config.block_out_channels) - 1)
        return ModelInfo(
            self.meta.get("run", "model"),
            "torch",
            conditioning,
            list(p.config.class_names or []),
            list(FLOW_SAMPLERS if is_flow(p.scheduler.config) else DDPM_SAMPLERS),
            p.default_size_px,
            multiple,
            trained,
            *_guidance(self.meta, conditioning),
        )

    def prompt_tokens(self):
        """A text model's tokenizer, to bound its prompts (sfumato.serve.prompts); None otherwise."""
        from sfumato.serve.prompts import PromptTokens

        tokenizer = self.pipe.tokenizer
        if self.pipe.text_encoder is None or tokenizer is None:
            return None
        return PromptTokens.from_transformers(tokenizer, self.pipe.config.text_max_length or tokenizer.model_max_length)

    def _pipe_for(self, sampler: str):
        from sfumato.diffusion.sample import sampler_from

        if sampler not in self._pipes:
            self._pipes[sampler] = type(self.pipe)(
                **{**self.pipe.components, "scheduler": sampler_from(self.pipe.scheduler.config, sampler)},
                **{k: self.pipe.config[k] for k in ("class_names", "text_max_length", "latent_scale", "latent_shift")},
            )
            self._pipes[sampler].set_progress_bar_config(disable=True)
        return self._pipes[sampler]

    def generate(self, jobs: list[Job], should_stop=lambda: False) -> list[list[np.ndarray]]:
        """uint8 HWC images per job."""
        first = jobs[0]
        if self.adapters:
            self._activate(first.model if first.model in self.adapters else None)
        pipe = self._pipe_for(first.sampler)
        kwargs: dict = {}
        if pipe.text_encoder is not None:
            kwargs["prompt"] = [j.prompt or "" for j in jobs for _ in range(j.num_images)]
            kwargs["negative_prompt"] = [j.negative_prompt or "" for j in jobs for _ in range(j.num_images)]
        elif pipe.num_classes:
            labels = [j.class_label for j in jobs for _ in range(j.num_images)]
            kwargs["class_labels"] = labels
        generators = [self.torch.Generator("cpu").manual_seed(j.seed + k) for j in jobs for k in range(j.num_images)]
        images = pipe(
            **kwargs,
            batch_size=len(generators),
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale if pipe.is_conditional else 1.0,
            guidance_interval=first.guidance_interval,
            generator=generators,
            output_type="np",
            callback=_stepper(should_stop),
        ).images
        return _split(_to_uint8(images), jobs)


class OnnxBackend:
    def __init__(self, export_dir: Path, model_file: str = "denoiser.onnx"):
        from sfumato.export.onnx_sampler import SAMPLER_JSON, OnnxSampler

        folder = ExportFolder(export_dir).onnx
        if not (folder / SAMPLER_JSON).exists():
            raise FileNotFoundError(f"{folder} holds no ONNX export ({SAMPLER_JSON}): run `sfumato export` first")
        self.sampler = OnnxSampler(folder, model_file)
        self.folder = folder
        self.meta = _meta(ExportFolder(export_dir).meta)

    def info(self) -> ModelInfo:
        spec = self.sampler.spec
        factor = spec.get("vae_scale_factor", 1)
        return ModelInfo(
            self.meta.get("run", "model"),
            "onnx",
            spec["conditioning"],
            list(spec["class_names"]),
            [self.sampler.sampler_name],
            spec["sample_size"] * factor,
            0,
            (),
            *_guidance(self.meta, spec["conditioning"]),
        )

    def prompt_tokens(self):
        """A text model's tokenizer (the export's onnx/tokenizer.json), to bound its prompts."""
        from sfumato.serve.prompts import PromptTokens

        if self.sampler.spec["conditioning"] != "text":
            return None
        return PromptTokens.from_file(self.folder / "tokenizer.json", self.sampler.spec["text_max_length"])

    def generate(self, jobs: list[Job], should_stop=lambda: False) -> list[list[np.ndarray]]:
        first = jobs[0]
        spec = self.sampler.spec
        shape = (spec["in_channels"], spec["sample_size"], spec["sample_size"])
        noise = np.stack(
            [np.random.default_rng(j.seed + k).standard_normal(shape) for j in jobs for k in range(j.num_images)]
        )
        prompts = labels = negatives = None
        if spec["conditioning"] == "text":
            prompts = [j.prompt or "" for j in jobs for _ in range(j.num_images)]
            negatives = [j.negative_prompt or "" for j in jobs for _ in range(j.num_images)]
        elif spec["conditioning"] == "class":
            labels = [
                spec["null_class"] if j.class_label is None else j.class_label
                for j in jobs
                for _ in range(j.num_images)
            ]
        guidance = first.guidance_scale if spec["conditioning"] != "none" else 1.0
        images = self.sampler(
            prompts,
            labels,
            len(noise),
            steps=first.steps,
            guidance_scale=guidance,
            noise=noise,
            callback=_stepper(should_stop),
            negative_prompts=negatives,
            guidance_interval=first.guidance_interval,
        )
        return _split(_to_uint8(images), jobs)


def _check_adapter(folder: Path) -> None:
    from sfumato.models.lora import LORA_WEIGHTS_FILE

    if not (Path(folder) / LORA_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {LORA_WEIGHTS_FILE}: give the lora/ folder of a LoRA run's export")


def _meta(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def _guidance(meta: dict, conditioning: str) -> tuple[float, tuple[float, float] | None]:
    """The run's evaluation guidance (scale, interval) from its export's meta; (1, None) where the
    model has no condition to guide by or the export predates the record."""
    if conditioning == "none":
        return 1.0, None
    interval = meta.get("guidance_interval")
    scale = float(meta.get("guidance_scale", 1.0))
    return scale, None if interval is None else (float(interval[0]), float(interval[1]))


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def _split(images: np.ndarray, jobs: list[Job]) -> list[list[np.ndarray]]:
    out, start = [], 0
    for job in jobs:
        out.append(list(images[start : start + job.num_images]))
        start += job.num_images
    return out


def load_backend(
    export_dir: Path,
    backend: str,
    device: str = "cpu",
    lora: Path | None = None,
    adapters: dict[str, Path] | None = None,
):
    if backend == "torch":
        return TorchBackend(export_dir, device, lora, adapters)
    if lora is not None or adapters:
        raise ValueError(
            "a LoRA adapter (--lora, adapters) is served by the torch backend; the ONNX export of a "
            "LoRA run already holds it merged"
        )
    if backend == "onnx":
        return OnnxBackend(export_dir)
    raise ValueError(f"serve backend {backend!r} is not one of torch, onnx")
