"""LoRA adapters on a denoiser, with peft (the library diffusers loads LoRA with).

`add_lora` wraps the chosen layers of the network (and of a text encoder that trains) in peft
LoRA layers and freezes everything else: only the adapters' A and B matrices train, go into the
optimizer, the EMA and the checkpoints. The base weights stay bitwise what they were loaded as
(the parent run's EMA weights, sfumato.train.finetune).

Export goes both ways: `adapter_state` is the adapter alone in diffusers' LoRA layout (keys
`unet.<module>.lora_A.weight`, the LoraConfig in the file's metadata), written by diffusers'
own `save_lora_weights`, which a SfumatoPipeline (or any Stable Diffusion pipeline for the
text models) loads with `load_lora_weights`; `merge_lora` folds the adapters into the base
weights in place, giving a plain network for the full export (diffusers folder, ONNX).
"""

from __future__ import annotations

import torch

ADAPTER_NAME = "default"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(folder) finds it


# The text encoder's attention projections by its config's model_type (train.text.encoder).
TEXT_ATTENTION = {"clip": ["q_proj", "k_proj", "v_proj", "out_proj"], "t5": ["q", "k", "v", "o"]}


# The layers that read or write the image's own channels: a UNet's first and last convolutions,
# a DiT's patch embedding and output projection (sfumato.models.dit). They stay the base's.
IMAGE_LAYERS = ("conv_in", "conv_out", "patch_embed", "proj_out")


def default_targets(net: torch.nn.Module, conv: bool) -> list[str]:
    """Every linear layer of the network (attention projections, feed-forward, time and adaLN
    embeddings; a DiT's caption projections too), its class-embedding table (what a class, and
    the "no class" label of classifier-free guidance, means to the model: the class model's
    counterpart of a text encoder), and with `conv` every convolution but those of IMAGE_LAYERS
    (their channels are the image's): the modules' full names, as peft targets."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d) if conv else (torch.nn.Linear, torch.nn.Embedding)
    names = set()
    for name, module in net.named_modules():
        if isinstance(module, kinds) and name not in IMAGE_LAYERS:
            names.add(name)
    if not names:
        raise ValueError(f"{type(net).__name__} has no linear{' or conv' if conv else ''} layer for LoRA")
    return sorted(names)


def lora_config(cfg, net: torch.nn.Module):
    """peft's LoraConfig from sfumato's `finetune.lora` section (config.LoraSection)."""
    from peft import LoraConfig

    targets = list(cfg.target_modules) if cfg.target_modules else default_targets(net, cfg.conv)
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights=True,
    )


def text_lora_config(cfg, text_encoder: torch.nn.Module):
    """peft's LoraConfig for the text encoder: its attention projections (TEXT_ATTENTION)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=TEXT_ATTENTION.get(text_encoder.config.model_type, TEXT_ATTENTION["clip"]),
    )


def add_lora(denoiser: torch.nn.Module, cfg) -> None:
    """Adapters on `denoiser.net` (and on its text encoder when cfg.text_encoder), every other
    parameter frozen. B starts at zero, so the adapted network first computes exactly what the
    base did."""
    from peft import inject_adapter_in_model

    config = lora_config(cfg, denoiser.net)
    try:
        inject_adapter_in_model(config, denoiser.net, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # a target that matches no module
        raise ValueError(f"finetune.lora.target_modules: {err}") from None
    if cfg.text_encoder:
        if denoiser.text_encoder is None:
            raise ValueError("finetune.lora.text_encoder: the model has no text encoder (not a *-text-* model)")
        inject_adapter_in_model(text_lora_config(cfg, denoiser.text_encoder), denoiser.text_encoder, ADAPTER_NAME)
    for name, param in denoiser.named_parameters():
        param.requires_grad_("lora_" in name)


def is_lora(name: str) -> bool:
    return "lora_" in name


def adapter_state(denoiser: torch.nn.Module) -> tuple[dict, dict | None]:
    """(unet adapter, text-encoder adapter or None) in peft's layout, as diffusers saves it."""
    from peft import get_peft_model_state_dict

    unet = get_peft_model_state_dict(denoiser.net, adapter_name=ADAPTER_NAME)
    text = None
    if denoiser.text_encoder is not None and any(is_lora(n) for n, _ in denoiser.text_encoder.named_parameters()):
        text = get_peft_model_state_dict(denoiser.text_encoder, adapter_name=ADAPTER_NAME)
    return unet, text


def save_adapter(denoiser: torch.nn.Module, folder, lora_cfg) -> None:
    """The adapter alone, in diffusers' LoRA format (folder/pytorch_lora_weights.safetensors, the
    LoraConfigs of the network and of a text encoder with adapters in its metadata), through
    diffusers' own writer. The text encoder's config must be there too: given the network's
    alone, diffusers' loader reads an empty one for the encoder and peft refuses it."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    def metadata(config) -> dict:
        meta = config.to_dict()
        meta["target_modules"] = sorted(meta["target_modules"])  # a set in peft: JSON needs a list
        return meta

    unet, text = adapter_state(denoiser)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder),
        unet_lora_layers={k: v.contiguous() for k, v in unet.items()},
        text_encoder_lora_layers=None if text is None else {k: v.contiguous() for k, v in text.items()},
        weight_name=LORA_WEIGHTS_FILE,
        unet_lora_adapter_metadata=metadata(lora_config(lora_cfg, denoiser.net)),
        text_encoder_lora_adapter_metadata=None
        if text is None
        else metadata(text_lora_config(lora_cfg, denoiser.text_encoder)),
    )


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer into its base layer and put the base layer back in its place:
    the module computes what it did with the adapters, with the base architecture's names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if not isinstance(layer, BaseTunerLayer):
            continue
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    for param in module.parameters():
        param.requires_grad_(True)
    return module
