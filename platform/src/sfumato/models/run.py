"""The model of a run folder, built once from its config the way training builds it.

Training calls `build_run_model` for fresh weights; evaluation, export and serving call
`load_trained`, which fills the same architecture from a committed checkpoint's EMA weights
(safetensors, written by this run) and wraps it as a `SfumatoPipeline`. The run folder keeps what
the weights were trained against: classes.json (class index -> name, copied from the shards at
the run's start) and, for text models, its tokenizer, so a rebuilt data folder cannot silently
change what a label or a token means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sfumato import checkpoint as ckpt
from sfumato.config import Config, load_run_config
from sfumato.layout import DataFolder, RunFolder
from sfumato.models.repa import without_projector


@dataclass
class RunModel:
    denoiser: torch.nn.Module
    """sfumato.models.registry.Denoiser: (x_t, t, cond) -> prediction."""
    codec: object | None
    """Latent mode: the frozen VAE (sfumato.models.vae.LatentCodec); None in pixel space."""
    tokenizer: object | None
    class_names: list[str]
    """Class index -> tag, empty for unconditional and text models."""
    model_px: int
    """The denoiser's input size at the first stage (latent cells in latent mode)."""
    channels: int


def run_classes(cfg: Config) -> list[str]:
    """Class names by index: the run folder's copy, else (a run not started yet) the shards'."""
    run, shards = RunFolder(cfg.train.output_dir), DataFolder(cfg.data.output_dir).shard_folder
    for path in (run.classes, shards.classes):
        if path.exists():
            classes = json.loads(path.read_text())
            return [name for name, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    raise FileNotFoundError(f"neither {run.classes} nor {shards.classes} exists: run `sfumato shards` first")


def build_run_model(cfg: Config, device: torch.device | str = "cpu", start_weights: bool = True) -> RunModel:
    """The run's denoiser with fresh weights (seeded by the caller), its VAE and tokenizer. A
    post-training run's (train.lineage) starts from its parent's weights instead (`start_weights`
    False skips loading them: the caller fills every weight itself), then gets its LoRA adapters
    (train.lora)."""
    run = _build(cfg, device)
    if cfg.train.lineage is not None and (start_weights or cfg.train.lora is not None):
        load_start_weights(cfg, run.denoiser)
    if cfg.train.lora is not None:
        from sfumato.models.lora import add_lora

        add_lora(run.denoiser, cfg.train.lora)
    training_levers(run.denoiser, cfg.train)
    return run


def training_levers(denoiser, train_cfg, progress: float = 0.0) -> None:
    """What the network does differently in training mode only (sampling and evaluation run
    eval()), at `progress` (the share of the run's training done): a DiT's token routing
    (train.routing), patch masking (train.masking, off for its last unmasked_fraction) and the
    tokens it keeps for REPA (train.repa; the projector and encoder: sfumato.models.repa.attach)."""
    routing, masking = train_cfg.routing, train_cfg.masking
    if train_cfg.repa is not None:
        denoiser.net.set_repa(train_cfg.repa.depth)
    if routing is not None:
        denoiser.net.set_routing(routing.ratio, routing.start_block, routing.end_block)
    if masking is not None:
        masked = progress < 1 - masking.unmasked_fraction
        denoiser.net.set_masking(masking.ratio if masked else None, masking.mixer_blocks)


def load_start_weights(cfg: Config, denoiser) -> None:
    """Into a freshly built denoiser (before any LoRA): the parent run's EMA weights at the
    lineage's checkpoint, or a diffusers folder's / hub id's network (and text encoder)."""
    lineage = cfg.train.lineage
    if lineage.parent is not None:
        if load_run_config(lineage.parent).train.lora is not None:
            raise ValueError(
                f"finetune.parent {lineage.parent} is a LoRA run: export it (`sfumato export` merges "
                "the adapter) and fine-tune from that export with finetune.pretrained"
            )
        folder = resolve_checkpoint(lineage.parent, lineage.checkpoint)
        weights = without_projector(ckpt.load_ema(folder))  # REPA's projector trains with its run only
        fill_parameters(denoiser, weights, f"the parent's {ckpt.ema_path(folder)}")
        return
    pretrained = lineage.pretrained
    net_class = type(denoiser.net)
    try:
        net = net_class.from_pretrained(pretrained, subfolder="unet")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"finetune.pretrained={pretrained!r}: no {net_class.__name__} in its unet/ folder: {err}"
        ) from None
    try:
        missing = denoiser.net.load_state_dict(net.state_dict(), strict=False)
    except RuntimeError as err:  # a shape that differs
        raise ValueError(
            f"finetune.pretrained={pretrained!r} does not fit train.model={cfg.train.model!r}: {err}"
        ) from None
    if missing.missing_keys or missing.unexpected_keys:
        raise ValueError(
            f"finetune.pretrained={pretrained!r} does not fit train.model={cfg.train.model!r}: missing "
            f"{missing.missing_keys[:3]}, unexpected {missing.unexpected_keys[:3]}"
        )
    if denoiser.text_encoder is not None:
        encoder = type(denoiser.text_encoder).from_pretrained(pretrained, subfolder="text_encoder")
        denoiser.text_encoder.load_state_dict(encoder.state_dict())


def _build(cfg: Config, device: torch.device | str) -> RunModel:
    from sfumato.models.registry import build_denoiser
    from sfumato.models.text import build_text_encoder, load_run_tokenizer
    from sfumato.models.vae import LatentCodec

    t = cfg.train
    # Lazy: a run training from the latent cache loads the VAE's weights only to decode grids.
    codec = LatentCodec.load(t.vae, device, lazy=True) if t.vae is not None else None
    model_px, channels = t.stages[0].resolution_px, 3
    if codec is not None:
        model_px, channels = codec.latent_size(model_px, "train.stages.0.resolution_px"), codec.channels
    if t.conditioning == "text":
        tokenizer = load_run_tokenizer(t.output_dir)
        model = build_denoiser(t.model, model_px, channels, text_encoder=build_text_encoder(t.text, tokenizer))
        return RunModel(model, codec, tokenizer, [], model_px, channels)
    names = run_classes(cfg) if t.conditioning == "class" else []
    model = build_denoiser(t.model, model_px, channels, len(names) or None)
    return RunModel(model, codec, None, names, model_px, channels)


def resolve_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """A committed checkpoint folder of the run: by name (step-00000010) or the newest."""
    checkpoints = RunFolder(run_dir).checkpoints
    done = ckpt.committed(checkpoints)
    if not done:
        raise FileNotFoundError(f"{checkpoints} holds no committed checkpoint: train the run first")
    if checkpoint is None:
        return done[-1]
    for path in done:
        if path.name == checkpoint:
            return path
    raise FileNotFoundError(f"no committed checkpoint {checkpoint!r} in {checkpoints}; have {[p.name for p in done]}")


def load_trained(
    run_dir: Path, checkpoint: str | None = None, overrides: list[str] | None = None, device: torch.device | str = "cpu"
) -> tuple[Config, RunModel, Path]:
    """(config, model with the checkpoint's EMA weights, checkpoint folder), eval mode."""
    cfg = load_run_config(run_dir, overrides)
    folder = resolve_checkpoint(run_dir, checkpoint)
    lora = cfg.train.lora is not None  # the checkpoint holds the adapters; the base is the lineage's
    run = build_run_model(cfg, device, start_weights=False)
    weights = without_projector(ckpt.load_ema(folder))  # REPA's projector: training only
    if any(name.startswith("net.transformer_blocks.") for name in weights):
        raise ValueError(
            f"{ckpt.ema_path(folder)} holds a diffusers DiTTransformer2DModel, the DiT presets sfumato had "
            f"before its own DiT (sfumato.models.dit) replaced them: this version cannot load run {run_dir}. "
            "Its export (a diffusers folder) still loads with DiffusionPipeline.from_pretrained(folder, "
            "trust_remote_code=True); to go on training, train a dit-* preset anew."
        )
    fill_parameters(run.denoiser, weights, f"{ckpt.ema_path(folder)} (model {cfg.train.model!r})", subset=lora)
    run.denoiser.to(device).eval()
    return cfg, run, folder


def fill_parameters(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, subset: bool = False
) -> None:
    """Copy `weights` into the model's parameters by name; names and shapes must match exactly
    (`source` names where the weights came from in the error). `subset`: the weights are those of
    the trainable parameters only (a LoRA run's adapters), and must be exactly those."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad} if subset else params.keys()
    if expected != weights.keys():
        missing, extra = expected - weights.keys(), weights.keys() - expected
        raise ValueError(
            f"{source} does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(value.shape)}, the model wants {tuple(params[name].shape)}"
                )
            params[name].copy_(value)


def pipeline(cfg: Config, run: RunModel, sampler: str):
    """The run's model as a SfumatoPipeline with the given sampler on its noise schedule."""
    from sfumato.diffusion.pipeline import SfumatoPipeline
    from sfumato.diffusion.sample import make_sampler

    codec = run.codec
    # Generate at the curriculum's last resolution by default (the net was built at the first).
    run.denoiser.net.register_to_config(
        sample_size=cfg.train.stages[-1].resolution_px // (codec.downsample if codec else 1)
    )
    pipe = SfumatoPipeline(
        unet=run.denoiser.net,
        scheduler=make_sampler(cfg.diffusion, sampler, cfg.train.stages[-1].resolution_px),
        text_encoder=run.denoiser.text_encoder,
        tokenizer=run.tokenizer,
        vae=None if codec is None else codec.vae,
        class_names=run.class_names or None,
        text_max_length=cfg.train.text.max_length if run.tokenizer is not None else None,
        latent_scale=1.0 if codec is None else codec.scale,
        latent_shift=0.0 if codec is None else codec.shift,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
