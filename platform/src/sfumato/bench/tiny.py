"""Tiny randomly initialised models of the real classes, for tests and benchmarks."""

from __future__ import annotations


def save_tiny_clip(folder):
    """A tiny randomly initialised CLIPModel with its processor and a BPE tokenizer, saved as a
    local pretrained folder (safetensors): what tests and benchmarks load through the real
    `from_pretrained` path, since no hub is reachable. Its embeddings are not semantic."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sfumato.models.text import train_tokenizer

    tokenizer = train_tokenizer([f"a photo of a {w}" for w in ("daisy", "rose", "tulip", "sunflower", "dandelion")] * 3,
                                300, 32)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_blip(folder):
    """A tiny randomly initialised BLIP captioner (BlipForConditionalGeneration) with its image
    processor and a BPE tokenizer, saved as a local pretrained folder. Its captions are noise."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from sfumato.models.text import train_tokenizer

    tokenizer = train_tokenizer([f"a photo of a {w} in a garden" for w in ("daisy", "rose", "tulip")] * 3, 300, 64)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.eos_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32, **ids)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
