"""Tiny randomly initialised models of the real classes, saved as local pretrained folders: what
tests and benchmarks load through the real `from_pretrained` path, since no hub is reachable."""

from __future__ import annotations


def _save_random_clip(
    folder,
    *,
    text_width: int,
    text_layers: int,
    text_heads: int,
    context: int,
    vision_width: int,
    vision_layers: int,
    vision_heads: int,
    image_size: int,
    patch_size: int,
    projection_dim: int,
    mlp_ratio: int,
):
    """A randomly initialised CLIPModel (seed 0) of the given shapes with its image processor and
    a small BPE tokenizer trained here, saved as a local pretrained folder (safetensors)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sfumato.models.text import train_tokenizer

    tokenizer = train_tokenizer(
        [f"a photo of a {w}" for w in ("daisy", "rose", "tulip", "sunflower", "dandelion")] * 3, 300, context
    )
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=mlp_ratio * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=mlp_ratio * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_clip(folder):
    """A tiny randomly initialised CLIPModel with its processor and a BPE tokenizer, saved as a
    local pretrained folder (safetensors): what tests and benchmarks load through the real
    `from_pretrained` path, since no hub is reachable. Its embeddings are not semantic."""
    _save_random_clip(
        folder,
        text_width=32,
        text_layers=1,
        text_heads=2,
        context=32,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
        mlp_ratio=2,
    )


def save_clip_b32_shaped(folder):
    """A randomly initialised CLIPModel with ViT-B/32's shapes (vision: 12 layers of 768, patch 32
    at 224 px; text: 12 layers of 512, context 77; projection 512) and its 224 px image processor:
    the compute of openai/clip-vit-base-patch32, the usual safety/curation model, for timing only.
    Its scores mean nothing."""
    _save_random_clip(
        folder,
        text_width=512,
        text_layers=12,
        text_heads=8,
        context=77,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
        mlp_ratio=4,
    )


def save_tiny_blip(folder):
    """A tiny randomly initialised BLIP captioner (BlipForConditionalGeneration) with its image
    processor and a BPE tokenizer, saved as a local pretrained folder. Its captions are noise."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from sfumato.models.text import train_tokenizer

    tokenizer = train_tokenizer([f"a photo of a {w} in a garden" for w in ("daisy", "rose", "tulip")] * 3, 300, 64)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.eos_token_id,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        encoder_hidden_size=32,
        **ids,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
