"""SfumatoPipeline: one diffusers `DiffusionPipeline` for every model sfumato trains.

Pixel or latent space (a VAE), unconditional, class-conditional (UNet2DModel or sfumato's DiT
with class labels, the last label meaning "no class") or text-conditional (UNet2DConditionModel
or sfumato's text DiT, with a CLIP or T5 text encoder), with classifier-free guidance (Ho &
Salimans 2022) for the conditional ones, optionally only inside an interval of noise levels
(Kynkäänniemi et al. 2024: guidance at high noise costs diversity and buys little).

This file imports only torch and diffusers, on purpose: `sfumato export` copies it verbatim into
the export folder as `sfumato_pipeline.py` and names it in model_index.json, so

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

loads and samples without sfumato installed. sfumato's own sampling (training grids,
evaluation, serving) runs this same class, so an export generates exactly what the run did.

Noise is drawn per image: `generator` may be a list with one seeded generator per image, and
then image i depends on its own seed only, not on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor


def null_class(unet) -> int | None:
    """The "no class" label (the last class embedding), or None for a net without labels."""
    count = unet.config.get("num_class_embeds")
    return None if count is None else count - 1


def predict(
    unet,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None = None,
    text_encoder: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The network's prediction for (x_t, t, cond), whatever the family (a UNet or sfumato's DiT,
    which takes the same arguments): `cond` is token ids for a text-conditional net (or, floating
    point, a frozen encoder's states of them, from the training's cache: sfumato.models.cache),
    class labels otherwise (None: the "no class" label)."""
    if text_encoder is not None:
        if cond is None:
            raise ValueError("a text-conditional model needs token ids (the empty caption's for 'no text')")
        states = cond if cond.is_floating_point() else text_encoder(input_ids=cond).last_hidden_state
        return unet(x_t, t, encoder_hidden_states=states.to(x_t.dtype)).sample
    null = null_class(unet)
    if null is None:
        return unet(x_t, t).sample
    if cond is None:
        cond = torch.full((x_t.shape[0],), null, device=x_t.device, dtype=torch.long)
    return unet(x_t, t, class_labels=cond).sample


class SfumatoPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """`load_lora_weights(folder)` loads an `sfumato export` LoRA adapter (diffusers' format, with
    peft), as for Stable Diffusion; `fuse_lora()` / `unload_lora_weights()` work as there."""

    _optional_components = ["text_encoder", "tokenizer", "vae"]
    model_cpu_offload_seq = "text_encoder->unet->vae"

    @classmethod
    def load_lora_into_unet(cls, state_dict, network_alphas, unet, *args, **kwargs):
        """diffusers loads a LoRA into a network through its PeftAdapterMixin, which
        UNet2DConditionModel has and UNet2DModel and sfumato's DiT lack: give this
        instance the mixin (its class gains it as a second base), then load as diffusers does."""
        if not hasattr(unet, "load_lora_adapter"):
            from diffusers.loaders.peft import PeftAdapterMixin

            unet.__class__ = type(type(unet).__name__, (type(unet), PeftAdapterMixin), {})
        return super().load_lora_into_unet(state_dict, network_alphas, unet, *args, **kwargs)

    def __init__(
        self,
        unet,
        scheduler,
        text_encoder=None,
        tokenizer=None,
        vae=None,
        class_names: list[str] | None = None,
        text_max_length: int | None = None,
        latent_scale: float = 1.0,
        latent_shift: float = 0.0,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(
            class_names=class_names,
            text_max_length=text_max_length,
            latent_scale=latent_scale,
            latent_shift=latent_shift,
        )

    # ----------------------------------------------------------------------------- facts
    @property
    def num_classes(self) -> int:
        """Class labels the model was trained on (0: none)."""
        null = null_class(self.unet)
        return 0 if null is None or self.text_encoder is not None else null

    @property
    def is_conditional(self) -> bool:
        return self.text_encoder is not None or self.num_classes > 0

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size_px(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_size(self, height: int, width: int) -> None:
        """Raises ValueError unless the model can generate height x width pixels."""
        factor = self.vae_scale_factor
        if "patch_size" in self.unet.config:
            # A DiT: any grid of whole patches (2D rotary positions); which sizes it was trained
            # on is the server's to check (the run's aspect buckets, in the export's meta).
            multiple = factor * self.unet.config.patch_size
        else:
            multiple = factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple} px, got {height}x{width}")

    # ----------------------------------------------------------------------- conditions
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        max_length = self.config.text_max_length or self.tokenizer.model_max_length
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        ).input_ids

    def _class_ids(self, class_labels) -> torch.Tensor:
        names = self.config.class_names or []
        ids = []
        for label in class_labels:
            if label is None:  # "no class": what guidance's unconditional pass uses
                ids.append(null_class(self.unet))
                continue
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"unknown class {label!r}; the model knows {names}")
                label = names.index(label)
            if not 0 <= int(label) < self.num_classes:
                raise ValueError(f"class label {label} is outside 0..{self.num_classes - 1}")
            ids.append(int(label))
        return torch.tensor(ids, dtype=torch.long)

    def conditions(
        self, prompt=None, negative_prompt=None, class_labels=None, prompt_ids=None, batch_size: int = 1
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(cond, uncond, batch size): token ids or class labels for the conditional and the
        guidance pass; None for an unconditional model."""
        if self.text_encoder is not None:
            if prompt_ids is None:
                prompts = [prompt] * batch_size if isinstance(prompt, str) or prompt is None else list(prompt)
                prompt_ids = self.tokenize([p or "" for p in prompts])
            n = len(prompt_ids)
            negatives = [negative_prompt or ""] * n if not isinstance(negative_prompt, list) else negative_prompt
            if len(negatives) != n:
                raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
            return prompt_ids, self.tokenize(negatives), n
        if prompt is not None or negative_prompt is not None:
            raise ValueError("this model is not text-conditional: it takes class_labels, not prompts")
        if self.num_classes:
            if class_labels is None:
                ids = torch.full((batch_size,), null_class(self.unet), dtype=torch.long)
            else:
                ids = self._class_ids([class_labels] if isinstance(class_labels, (int, str)) else class_labels)
            return ids, torch.full_like(ids, null_class(self.unet)), len(ids)
        if class_labels is not None:
            raise ValueError("this model is unconditional: it takes no class_labels")
        return None, None, batch_size

    # ---------------------------------------------------------------------------- sample
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        class_labels=None,
        prompt_ids: torch.Tensor | None = None,
        batch_size: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ):
        """Images for the prompts / class labels (or `batch_size` unconditional ones).
        `latents`: the starting noise (else drawn from `generator`, one per image when a list).
        `guidance_interval` (lo, hi): guide only at steps whose noise level t / num_train_timesteps
        (1: pure noise) lies in [lo, hi]; the other steps make one conditional model call.
        `callback(step_index, t)` runs before every denoising step; raising there cancels.
        output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent"."""
        device = self._execution_device
        height, width = height or self.default_size_px, width or self.default_size_px
        self.check_size(height, width)
        cond, uncond, n = self.conditions(prompt, negative_prompt, class_labels, prompt_ids, batch_size)
        guided = guidance_scale != 1.0
        if guided and cond is None:
            raise ValueError("guidance_scale needs a conditional model (this one is unconditional)")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        pair = None if cond is None else torch.cat([uncond, cond]).to(device)
        cond = None if cond is None else cond.to(device)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images")

        factor = self.vae_scale_factor
        shape = (n, self.unet.config.in_channels, height // factor, width // factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        x = (
            latents.to(device, self.unet.dtype)
            if latents is not None
            else randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        )
        # DDPM schedulers scale the noise and the model input; flow-matching ones do neither.
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if callback is not None:
                callback(i, t)
            # DDPM timesteps are integers, flow-matching ones t x num_train_timesteps in floats.
            level = t.item() / self.scheduler.config.num_train_timesteps
            guide = guided and (guidance_interval is None or guidance_interval[0] <= level <= guidance_interval[1])
            model_input = scale(torch.cat([x, x]) if guide else x, t)
            t_batch = torch.full((model_input.shape[0],), t.item(), device=device, dtype=t.dtype)
            prediction = predict(self.unet, model_input, t_batch, pair if guide else cond, self.text_encoder)
            if guide:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            x = self.scheduler.step(prediction, t, x, generator=generator).prev_sample

        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                latents = x.to(self.vae.dtype) / self.config.latent_scale + self.config.latent_shift
                x = self.vae.decode(latents).sample
            images = (x.float() / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
