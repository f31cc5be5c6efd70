"""Generate images with the exported ONNX denoiser and nothing but numpy and onnxruntime.

This file is standalone on purpose: `sfumato export` copies it into the export's onnx/ folder
next to denoiser.onnx (or denoiser.int8.onnx), sampler.json (the noise schedule and how the
model is conditioned), the tokenizer (text models; read with the `tokenizers` library) and
vae_decoder.onnx (latent models). From that folder:

    python sample_onnx.py --out grid.png --seed 0 --steps 30 --class 3     # class model
    python sample_onnx.py --out grid.png --prompt "a red circle" --guidance 3 --negative-prompt "blurry"
    python sample_onnx.py --out grid.png --class 3 --guidance 3 --guidance-interval 0.2 0.8

The sampler is the one of the model's objective (sampler.json's `objective`): for DDPM models
DDIM with eta 0 and "trailing" timesteps (Song et al. 2021; Lin et al. 2023), the same arithmetic
as diffusers' DDIMScheduler; for flow-matching models Euler steps along the predicted velocity on
the sigmas of diffusers' FlowMatchEulerDiscreteScheduler (the run's time shift, a final sigma of
0). Given the same starting noise it follows the PyTorch pipeline's DDIM or flow-euler trajectory.
Its own noise comes from numpy (seed + i for image i), not torch's generator, so its images are
not the torch pipeline's for the same seed unless the noise is passed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLER_JSON = "sampler.json"
SAMPLERS = {"ddpm": "ddim", "flow": "flow-euler"}
"""The sampler this file runs for a model of each objective (by sfumato's sampler names)."""


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """DDIMScheduler's "trailing" timesteps: from the last trained one down, every total / steps."""
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1


def flow_schedule(num_train_timesteps: int, shift: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) exactly as FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)
    .set_timesteps(steps) makes them (diffusers 0.42), float32: `steps` timesteps sigma x total,
    and steps + 1 sigmas ending at 0. diffusers shifts twice on purpose of its own: the end of
    the linspace is the smallest training sigma, already shifted, and the linspace is shifted
    again."""
    total = num_train_timesteps
    train = np.linspace(1, total, total, dtype=np.float32)[::-1] / np.float32(total)
    train = shift * train / (1 + (shift - 1) * train)  # float32: the scheduler's training sigmas
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * total, sigma_min * total, steps) / total  # float64, as in set_timesteps
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    return sigmas * np.float32(total), np.concatenate([sigmas, np.zeros(1, np.float32)])


class OnnxSampler:
    def __init__(self, folder: str | Path, model_file: str = "denoiser.onnx", threads: int | None = None):
        folder = Path(folder)
        self.spec = json.loads((folder / SAMPLER_JSON).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(folder / model_file), options, providers=providers)
        self.decoder = None
        if self.spec["latent"]:
            self.decoder = ort.InferenceSession(str(folder / "vae_decoder.onnx"), options, providers=providers)
        self.tokenizer = None
        if self.spec["conditioning"] == "text":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            length = self.spec["text_max_length"]
            self.tokenizer.enable_truncation(length)
            self.tokenizer.enable_padding(length=length, pad_id=self.spec["pad_token_id"])
        self.objective = self.spec.get("objective", "ddpm")  # exports before flow matching: DDPM
        if self.objective not in SAMPLERS:
            raise ValueError(f"{folder / SAMPLER_JSON}: objective {self.objective!r} is not one of {list(SAMPLERS)}")
        self.sampler_name = SAMPLERS[self.objective]
        if self.objective == "ddpm":
            self.alphas_cumprod = np.asarray(self.spec["alphas_cumprod"], dtype=np.float64)

    # ---------------------------------------------------------------------- conditions
    def _conditions(
        self, prompts, class_labels, count: int, negative_prompts=None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(cond, uncond): token ids of the prompts and of the negative prompts (the empty
        caption's by default: guidance's unconditional pass), or class labels and "no class"."""
        kind = self.spec["conditioning"]
        if kind == "text":
            prompts = [""] * count if prompts is None else list(prompts)
            negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            ids = np.asarray([e.ids for e in self.tokenizer.encode_batch(prompts + negatives)], dtype=np.int64)
            return ids[: len(prompts)], ids[len(prompts) :]
        if kind == "class":
            names = self.spec["class_names"]
            null = self.spec["null_class"]
            labels = (
                [null] * count
                if class_labels is None
                else [names.index(c) if isinstance(c, str) else int(c) for c in class_labels]
            )
            cond = np.asarray(labels, dtype=np.int64)
            return cond, np.full_like(cond, null)
        return None, None

    def _predict(self, x: np.ndarray, t, cond: np.ndarray | None) -> np.ndarray:
        # DDPM graphs take integer timesteps, flow-matching ones t x num_train_timesteps in float32.
        dtype = np.float32 if self.objective == "flow" else np.int64
        feed = {"sample": x.astype(np.float32), "timestep": np.full((x.shape[0],), t, dtype=dtype)}
        if cond is not None:
            feed["cond"] = cond
        return self.session.run(None, feed)[0].astype(np.float64)

    def _guided(self, x: np.ndarray, t, cond, uncond, guidance_scale: float, interval) -> np.ndarray:
        """The prediction, with classifier-free guidance (Ho & Salimans 2022) when the scale is not 1
        and t's noise level (t / num_train_timesteps, 1: pure noise) lies in `interval` (lo, hi),
        or at every step when it is None, as the PyTorch pipeline guides."""
        level = float(t) / self.spec["num_train_timesteps"]
        if guidance_scale == 1.0 or (interval is not None and not interval[0] <= level <= interval[1]):
            return self._predict(x, t, cond)
        both = self._predict(np.concatenate([x, x]), t, np.concatenate([uncond, cond]))
        unconditional, conditional = np.split(both, 2)
        return unconditional + guidance_scale * (conditional - unconditional)

    # -------------------------------------------------------------------------- sample
    def timesteps(self, steps: int) -> np.ndarray:
        total = self.spec["num_train_timesteps"]
        if self.objective == "flow":
            return flow_schedule(total, self.spec["shift"], steps)[0]
        return ddim_timesteps(total, steps)

    def _ddim(self, x: np.ndarray, steps: int, predict, callback) -> np.ndarray:
        abar = self.alphas_cumprod
        total = self.spec["num_train_timesteps"]
        for i, t in enumerate(ddim_timesteps(total, steps)):
            if callback is not None:
                callback(i, int(t))
            prediction = predict(x, int(t))
            a, prev = abar[t], t - total // steps
            a_prev = abar[prev] if prev >= 0 else 1.0  # DDIM's final alpha: set_alpha_to_one
            if self.spec["prediction_type"] == "v_prediction":
                x0 = np.sqrt(a) * x - np.sqrt(1 - a) * prediction
                eps = np.sqrt(a) * prediction + np.sqrt(1 - a) * x
            else:
                eps = prediction
                x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        return x

    def _flow_euler(self, x: np.ndarray, steps: int, predict, callback) -> np.ndarray:
        """x_{sigma'} = x_sigma + (sigma' - sigma) v: Euler along the predicted velocity eps - x_0."""
        timesteps, sigmas = flow_schedule(self.spec["num_train_timesteps"], self.spec["shift"], steps)
        for i, t in enumerate(timesteps):
            if callback is not None:
                callback(i, float(t))
            x = x + float(sigmas[i + 1] - sigmas[i]) * predict(x, t)
        return x

    def __call__(
        self,
        prompts: list[str] | None = None,
        class_labels=None,
        num_images: int = 1,
        seed: int = 0,
        steps: int = 30,
        guidance_scale: float = 1.0,
        noise: np.ndarray | None = None,
        callback=None,
        raw: bool = False,
        negative_prompts: list[str] | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Images as float NHWC in [0, 1]; raw=True: the final sample before any decoding or
        clipping (NCHW, latents for a latent model). `callback(step_index, t)` runs before every
        step. `negative_prompts` (text models, one per prompt): what guidance steers away from.
        `guidance_interval` (lo, hi): guide only at steps whose noise level t / num_train_timesteps
        (1: pure noise) lies in [lo, hi], one conditional call at the others (Kynkäänniemi et al.
        2024); None: at every step."""
        cond, uncond = self._conditions(prompts, class_labels, num_images, negative_prompts)
        count = num_images if cond is None else len(cond)
        if guidance_scale != 1.0 and cond is None:
            raise ValueError("guidance_scale needs a conditional model (this one is unconditional)")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        if noise is None:
            shape = (self.spec["in_channels"], self.spec["sample_size"], self.spec["sample_size"])
            noise = np.stack([np.random.default_rng(seed + i).standard_normal(shape) for i in range(count)])
        x = noise.astype(np.float64)
        predict = lambda x, t: self._guided(x, t, cond, uncond, guidance_scale, guidance_interval)  # noqa: E731
        x = (self._flow_euler if self.objective == "flow" else self._ddim)(x, steps, predict, callback)
        if raw:
            return x
        if self.decoder is not None:
            latents = x / self.spec["latent_scale"] + self.spec["latent_shift"]
            x = self.decoder.run(None, {"latents": latents.astype(np.float32)})[0].astype(np.float64)
        return np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description="sample with the exported ONNX denoiser")
    parser.add_argument("--folder", default=str(Path(__file__).parent))
    parser.add_argument("--model", default="denoiser.onnx", help="or denoiser.int8.onnx")
    parser.add_argument("--out", required=True, help="PNG grid to write")
    parser.add_argument("--prompt", action="append", help="text models (repeat for several images)")
    parser.add_argument("--negative-prompt", default=None, help="text models: what guidance steers away from")
    parser.add_argument("--class", dest="classes", action="append", help="class models: index or name")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="guide only at noise levels in [LO, HI] (1: pure noise); default: every step",
    )
    args = parser.parse_args()
    from PIL import Image

    labels = [int(c) if c.isdigit() else c for c in args.classes] if args.classes else None
    negatives = None if args.negative_prompt is None or not args.prompt else [args.negative_prompt] * len(args.prompt)
    sampler = OnnxSampler(args.folder, args.model)
    images = to_uint8(
        sampler(
            args.prompt,
            labels,
            args.num_images,
            args.seed,
            args.steps,
            args.guidance,
            negative_prompts=negatives,
            guidance_interval=args.guidance_interval,
        )
    )
    Image.fromarray(np.concatenate(list(images), axis=1)).save(args.out)


if __name__ == "__main__":
    main()
