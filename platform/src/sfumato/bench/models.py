"""`sfumato bench models`: what each denoiser preset costs, in one run.

1. The presets at 256 px in Stable Diffusion's latent space (its VAE's 4 channels, 8x smaller
   sides: a 32 x 32 latent, which sfumato's DiT cuts into 256 tokens of 2 x 2): parameters and
   forward FLOPs per image, every DiT preset beside the UNets (and Stable Diffusion 1.x's UNet,
   for scale). Class models have ImageNet's
   1,000 classes; text models read a caption of 77 tokens, 768 wide (CLIP ViT-L/14's states, as
   Stable Diffusion 1.x; a frozen encoder's cached states, so the encoder's cost is not in the
   figure). Every network is built on PyTorch's meta device: XL's weights are never allocated.
   FLOPs are counted by torch.utils.flop_counter (a multiply-add is 2 FLOPs; matrix products,
   convolutions and attention, nothing element-wise). On the meta device SDPA runs its math form
   and its two matrix products are counted; on the CPU its fused kernel is outside the counter's
   registry and attention would count 0. The DiT counts are checked against `dit_forward_flops`,
   the closed form, in tests/unit/test_bench_models.py.
2. The training step on this CPU (forward, backward and AdamW, batch 32, 32 px in pixel space,
   fp32, the PlainEngine the plain loop uses): the step cost that decides what a CPU pilot can
   afford. Text models carry configs/pilot-text.yaml's from-scratch encoder, trained with them.
   Models are timed in interleaved rounds (one step of each per round, the median per model), so
   a neighbour's load falls on all of them alike, in wall time and in the process's CPU time
   (which a neighbour moves less); unet-xs, the class pilot's model, is the baseline.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from sfumato.bench import add_out_argument, add_repo_argument, checkout, publish
from sfumato.models.names import MODEL_FAMILIES, TEXT_MODELS, TRANSFORMERS

# Stable Diffusion's latent space at 256 px, and its caption (CLIP ViT-L/14: 77 tokens x 768).
RESOLUTION_PX, LATENT_CHANNELS, VAE_DOWNSAMPLE = 256, 4, 8
CAPTION_TOKENS, CAPTION_WIDTH = 77, 768
CLASSES = 1000  # ImageNet's, as DiT's
SD_UNET = "Stable Diffusion 1.x UNet (reference)"
TIMESTEP_FEATURES = 256  # sfumato.models.dit.SfumatoDiT.timestep_features' width

# The CPU step: the pilots' batch and size, and the TREAD routing the DiT row is also timed with.
STEP_MODELS = ("unet-xs", "unet-text-xs", "dit-xs", "dit-text-xs", "mmdit-xs")
ROUTED = ("dit-text-xs", (0.5, 1, -1))  # half the image tokens skip blocks 1..depth-2
STEP_BATCH, STEP_PX, STEP_CLASSES = 32, 32, 10


# ----------------------------------------------------------------------- counting on meta
def conditioning(name: str) -> int:
    """The `cond` a preset is built with here: the caption's width (text) or the class count."""
    return CAPTION_WIDTH if name in TEXT_MODELS else CLASSES


def build_on_meta(name: str, side: int, channels: int) -> torch.nn.Module:
    """The preset's network, shapes only (no memory for its weights)."""
    from sfumato.models.registry import MODELS

    with torch.device("meta"):
        return MODELS[name](side, channels, conditioning(name))


def forward_flops(net: torch.nn.Module, side: int, channels: int, text: bool, batch: int = 1) -> int:
    """FLOPs of one forward of `net` on a batch of `side` x `side` inputs, on its device (meta: no
    arithmetic is done), with a caption of CAPTION_TOKENS x CAPTION_WIDTH or a class label."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device
    x = torch.zeros(batch, channels, side, side, device=device)
    t = torch.full((batch,), 500, device=device)
    if text:
        kwargs = {"encoder_hidden_states": torch.zeros(batch, CAPTION_TOKENS, CAPTION_WIDTH, device=device)}
    else:
        kwargs = {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, **kwargs)
    return counter.get_total_flops()


@dataclass(frozen=True)
class PresetRow:
    model: str
    family: str
    parameters: int
    forward_flops: int  # per image, at RESOLUTION_PX in the latent space

    @property
    def training_flops(self) -> int:
        """Forward + backward: 3x the forward (the backward is two products per forward one)."""
        return 3 * self.forward_flops


def preset_row(name: str, resolution_px: int = RESOLUTION_PX) -> PresetRow:
    side = resolution_px // VAE_DOWNSAMPLE
    net = build_on_meta(name, side, LATENT_CHANNELS)
    parameters = sum(p.numel() for p in net.parameters())
    return PresetRow(
        name, MODEL_FAMILIES[name], parameters, forward_flops(net, side, LATENT_CHANNELS, name in TEXT_MODELS)
    )


def stable_diffusion_unet_row(resolution_px: int = RESOLUTION_PX) -> PresetRow:
    """Stable Diffusion 1.x's UNet (diffusers' UNet2DConditionModel defaults with CLIP ViT-L's
    768-wide states), for scale: not a preset."""
    from diffusers import UNet2DConditionModel

    side = resolution_px // VAE_DOWNSAMPLE
    with torch.device("meta"):
        net = UNet2DConditionModel(sample_size=side, cross_attention_dim=CAPTION_WIDTH)
    parameters = sum(p.numel() for p in net.parameters())
    return PresetRow(SD_UNET, "reference", parameters, forward_flops(net, side, LATENT_CHANNELS, text=True))


def preset_names() -> list[str]:
    """Every registered preset, the DiTs first, each family in the registry's order."""
    return sorted(MODEL_FAMILIES, key=lambda n: (n not in TRANSFORMERS, list(MODEL_FAMILIES).index(n)))


def preset_table(resolution_px: int = RESOLUTION_PX) -> list[PresetRow]:
    """Every preset's row, then Stable Diffusion 1.x's UNet for scale."""
    return [preset_row(name, resolution_px) for name in preset_names()] + [stable_diffusion_unet_row(resolution_px)]


def dit_forward_flops(
    depth: int,
    hidden: int,
    tokens: int,
    mlp_width: int,
    text: str | None = None,
    caption_tokens: int = CAPTION_TOKENS,
    caption_width: int = CAPTION_WIDTH,
    channels: int = LATENT_CHANNELS,
    patch: int = 2,
) -> int:
    """sfumato's DiT forward, per image, in closed form (2 FLOPs a multiply-add, products only):
    with d = hidden, T image tokens, L caption tokens, m the SwiGLU's inner width, each block
    costs 12d^2 (adaLN) + 8Td^2 (q, k, v, out) + 4T^2 d (attention) + 6Tdm (SwiGLU); cross
    attention adds 4Td^2 + 4Ld^2 + 4TLd; joint attention gives the caption its own stream
    (12d^2 + 8Ld^2 + 6Ldm) and attends over T + L tokens. Around the blocks: the patch
    embedding, the timestep MLP, the caption's projection and pool, the output's adaLN and
    projection. Independent of the heads' count."""
    d, t, m, length = hidden, tokens, mlp_width, caption_tokens
    block = 12 * d * d + 8 * t * d * d + 6 * t * d * m
    if text == "joint":
        block += 12 * d * d + 8 * length * d * d + 6 * length * d * m + 4 * (t + length) ** 2 * d
    else:
        block += 4 * t * t * d
    if text == "cross":
        block += 4 * t * d * d + 4 * length * d * d + 4 * t * length * d
    outside = 2 * t * d * channels * patch * patch * 2  # patch embedding in, projection out
    outside += 2 * (TIMESTEP_FEATURES * d + d * d) + 4 * d * d  # timestep MLP, output adaLN
    if text is not None:
        outside += 2 * length * (caption_width * d + d * d) + 2 * caption_width * d  # projection, pool
    return depth * block + outside


# ------------------------------------------------------------------------- the CPU step
def _pilot_text_encoder(text_cfg) -> torch.nn.Module:
    """configs/pilot-text.yaml's from-scratch encoder (a CLIPTextModel of its sizes), trained with
    the denoiser as in the text pilot."""
    import transformers

    return transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=text_cfg.vocab_size,
            hidden_size=text_cfg.hidden_size,
            intermediate_size=4 * text_cfg.hidden_size,
            num_hidden_layers=text_cfg.num_layers,
            num_attention_heads=text_cfg.num_heads,
            max_position_embeddings=text_cfg.max_length,
            bos_token_id=1,  # CLIP's defaults lie outside a small vocabulary
            eos_token_id=2,
            pad_token_id=0,
        )
    )


class StepTimer:
    """One model's training step on a fixed batch, PlainEngine (AdamW) as the plain loop's."""

    def __init__(self, name: str, text_cfg, routing: tuple[float, int, int] | None = None, seed: int = 0):
        from sfumato.config import OptimizerConfig
        from sfumato.models.registry import build_denoiser, parameter_count
        from sfumato.train.step import PlainEngine

        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.text = name in TEXT_MODELS
        encoder = _pilot_text_encoder(text_cfg) if self.text else None
        model = build_denoiser(name, STEP_PX, 3, None if self.text else STEP_CLASSES, text_encoder=encoder)
        if routing is not None:
            model.net.set_routing(*routing)
        self.label = name + (f" (routing {routing[0]}, blocks {routing[1]}..{routing[2]})" if routing else "")
        self.parameters = parameter_count(model.net)
        self.encoder_parameters = parameter_count(encoder) if encoder is not None else 0
        self.engine = PlainEngine(model.train(), OptimizerConfig(lr=1e-4))
        self.state = self._state(text_cfg.max_length)
        self.batch = {
            "image": rng.integers(0, 256, (STEP_BATCH, STEP_PX, STEP_PX, 3), dtype=np.uint8),
            "class": rng.integers(0, STEP_CLASSES, STEP_BATCH),
            "tokens": rng.integers(0, text_cfg.vocab_size, (STEP_BATCH, text_cfg.max_length)),
        }
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def _state(self, max_length: int):
        from sfumato.config import DiffusionConfig
        from sfumato.diffusion.schedule import NoiseSchedule
        from sfumato.train.step import TrainState

        diffusion = DiffusionConfig(objective="flow")
        return TrainState(
            engine=self.engine,
            schedule=NoiseSchedule.from_config(diffusion),
            diffusion_cfg=diffusion,
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
            null_class=None if self.text else STEP_CLASSES,
            max_length=max_length,
        )

    def _loss(self, model, batch, state):
        """The diffusion loss of the batch: class labels with dropout (image_loss), or its token ids."""
        from sfumato.train.step import batch_to_tensors, image_loss, loss_fn

        if not self.text:
            return image_loss(model, batch, state)
        x0, _ = batch_to_tensors(batch, state.device, state.dtype)
        return loss_fn(model, x0, torch.from_numpy(batch["tokens"]), state)

    def step(self, timed: bool = True) -> None:
        from sfumato.train.step import train_step

        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(self.state, self.batch, self._loss)
        if timed:
            self.seconds.append(time.perf_counter() - start)
            self.cpu_seconds.append(time.process_time() - cpu_start)

    @property
    def ms_per_step(self) -> float:
        return 1000 * statistics.median(self.seconds)

    @property
    def cpu_ms_per_step(self) -> float:
        """The process's CPU time (all threads): less moved than the wall clock by a neighbour's load."""
        return 1000 * statistics.median(self.cpu_seconds)


def time_steps(text_cfg, rounds: int, warmup: int = 1) -> list[StepTimer]:
    """Every STEP_MODELS model and the routed one, `rounds` timed steps each, interleaved."""
    timers = [StepTimer(name, text_cfg) for name in STEP_MODELS]
    timers.append(StepTimer(ROUTED[0], text_cfg, routing=ROUTED[1]))
    for _ in range(warmup):
        for timer in timers:
            timer.step(timed=False)
    for _ in range(rounds):
        for timer in timers:
            timer.step()
    return timers


# ------------------------------------------------------------------------------ the bench
def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="timed CPU steps per model (0: the preset table only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the CPU steps (default: torch's)")
    add_repo_argument(parser, "configs/pilot-text.yaml (the text encoder of the CPU step)")
    add_out_argument(parser)


def _billions(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


def run(args) -> dict:
    from sfumato.bench.ingest import machine

    rows = preset_table()
    lines = [
        f"Presets at {RESOLUTION_PX} px in SD's latent space ({LATENT_CHANNELS} x {RESOLUTION_PX // VAE_DOWNSAMPLE} "
        f"x {RESOLUTION_PX // VAE_DOWNSAMPLE}); text: {CAPTION_TOKENS} x {CAPTION_WIDTH} caption states; "
        f"class: {CLASSES} classes",
        "",
        "| model | family | parameters | forward GFLOPs / image | training GFLOPs / image |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r.model} | {r.family} | {r.parameters / 1e6:,.1f} M | {_billions(r.forward_flops)} "
            f"| {_billions(r.training_flops)} |"
            for r in rows
        ),
    ]
    result = {
        "machine": machine(),
        "presets": {
            "resolution_px": RESOLUTION_PX,
            "latent": [LATENT_CHANNELS, RESOLUTION_PX // VAE_DOWNSAMPLE, RESOLUTION_PX // VAE_DOWNSAMPLE],
            "caption": [CAPTION_TOKENS, CAPTION_WIDTH],
            "classes": CLASSES,
            "rows": [{**r.__dict__, "training_flops": r.training_flops} for r in rows],
        },
    }
    if args.rounds:
        from sfumato.config import load_config

        if args.threads:
            torch.set_num_threads(args.threads)
        text_cfg = load_config(
            checkout(args.repo, "configs/pilot-text.yaml") / "configs" / "pilot-text.yaml"
        ).train.text
        timers = time_steps(text_cfg, args.rounds)
        base, cpu_base = timers[0].ms_per_step, timers[0].cpu_ms_per_step
        result["cpu_step"] = {
            "batch": STEP_BATCH,
            "resolution_px": STEP_PX,
            "precision": "fp32",
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "rows": [
                {
                    "model": t.label,
                    "parameters": t.parameters,
                    "text_encoder_parameters": t.encoder_parameters,
                    "ms_per_step": round(t.ms_per_step, 1),
                    "cpu_ms_per_step": round(t.cpu_ms_per_step, 1),
                    "images_per_s": round(STEP_BATCH * 1000 / t.ms_per_step, 1),
                    "over_unet_xs": round(t.ms_per_step / base, 2),
                    "cpu_over_unet_xs": round(t.cpu_ms_per_step / cpu_base, 2),
                }
                for t in timers
            ],
        }
        lines += [
            "",
            f"Training step on this CPU: batch {STEP_BATCH}, {STEP_PX} px pixel space, fp32, forward + backward + "
            f"AdamW, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds",
            "",
            "| model | parameters (+ text encoder) | wall ms / step | images / s | x unet-xs | CPU ms / step "
            "| x unet-xs |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {r['model']} | {r['parameters'] / 1e6:.2f} M"
                + (f" + {r['text_encoder_parameters'] / 1e6:.2f} M" if r["text_encoder_parameters"] else "")
                + f" | {r['ms_per_step']:,.0f} | {r['images_per_s']} | {r['over_unet_xs']} "
                f"| {r['cpu_ms_per_step']:,.0f} | {r['cpu_over_unet_xs']} |"
                for r in result["cpu_step"]["rows"]
            ),
            f"load average at the start {result['machine']['load_avg_at_start']}, at the end "
            f"{result['cpu_step']['load_avg_at_end']}",
        ]
    return publish(result, "\n".join(lines), args.out)
