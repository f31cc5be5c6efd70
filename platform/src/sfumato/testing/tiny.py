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


TINY_CAPTIONS = [
    f"a photo of a {w}"
    for w in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
]
"""What the tiny text tokenizers are trained on (CIFAR-10's classes, the captions of tests' shards)."""


def _tiny_t5_tokenizer(captions: list[str], max_length: int):
    """A sentencepiece-style Unigram tokenizer learned with `tokenizers` (no sentencepiece
    needed), wrapped as transformers' T5Tokenizer: <pad>=0, </s>=1, <unk>=2, the end token
    appended, as T5's own."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(captions, trainer=trainer)
    vocab = [tuple(piece) for piece in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def save_tiny_text_encoder(folder, encoder: str, max_length: int = 32):
    """A randomly initialised (seed 0) text encoder of the real class, CLIPTextModel (`encoder`
    clip) or T5EncoderModel (t5), of width 32 and 2 layers, saved as a Stable-Diffusion-style
    pretrained folder: folder/text_encoder (safetensors) and folder/tokenizer (a BPE tokenizer for
    CLIP, a Unigram one in T5Tokenizer for T5), both trained here on TINY_CAPTIONS. T5 keeps its
    default dropout_rate 0.1, so a frozen encoder left in train mode would show. Returns the encoder."""
    from pathlib import Path

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sfumato.models.text import train_tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    if encoder == "clip":
        tokenizer = train_tokenizer(TINY_CAPTIONS * 3, 300, max_length)
        model = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=max_length,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    elif encoder == "t5":
        tokenizer = _tiny_t5_tokenizer(TINY_CAPTIONS * 3, max_length)
        model = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
    else:
        raise ValueError(f"encoder {encoder!r}: clip or t5")
    model.save_pretrained(folder / "text_encoder")  # safetensors
    tokenizer.save_pretrained(folder / "tokenizer")
    return model
