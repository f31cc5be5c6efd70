"""Text conditioning: a tokenizer and a text encoder, transformers' `CLIPTextModel` or
`T5EncoderModel` (train.text.encoder).

Either both are pretrained, loaded from a hub id or a local folder (safetensors only), or the
run is from scratch (CLIP only): a byte-level BPE tokenizer is trained with `tokenizers` on the
manifest's captions and a randomly initialised `CLIPTextModel` of the configured size is trained
jointly with the denoiser. Either way the run folder keeps its own copy of the tokenizer
(`text/tokenizer/`), so a resumed or exported run never depends on where it came from.

The denoiser cross-attends to the encoder's last hidden states at every position, padding
included, with no attention mask, as Stable Diffusion does with CLIP and SD3 and Flux do with T5
(their diffusers pipelines call the encoder on the padded ids alone): the padded states are a
fixed function of the caption, the same in training, in the cache, in the export and in ONNX.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch

from sfumato.layout import RunFolder

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


def manifest_captions(manifest: Path) -> Iterator[str]:
    """Captions of the manifest's accepted rows, streamed a record batch at a time."""
    for batch in pq.ParquetFile(manifest).iter_batches(columns=["caption", "status"], batch_size=8192):
        for caption, status in zip(batch.column("caption").to_pylist(), batch.column("status").to_pylist()):
            if status == "ok" and caption:
                yield caption


def train_tokenizer(captions: Iterable[str], vocab_size: int, max_length: int):
    """A lower-casing byte-level BPE tokenizer (CLIP's scheme) learned from `captions`,
    wrapped as a transformers fast tokenizer that pads and truncates to `max_length`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=max_length
    )


def load_pretrained_tokenizer(source: str, subfolder: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, subfolder=subfolder or "")


def prepare_tokenizer(text_cfg, manifest: Path, run_dir: Path):
    """The run's tokenizer, made once: a resumed run reuses the saved one (its vocabulary is
    what the encoder was trained on), whatever the config or the manifest say now."""
    from transformers import AutoTokenizer

    folder = RunFolder(run_dir).tokenizer
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    if text_cfg.pretrained:
        tokenizer = load_pretrained_tokenizer(text_cfg.pretrained, text_cfg.tokenizer_subfolder)
    else:
        if not manifest.exists():
            raise FileNotFoundError(
                f"{manifest} does not exist: a from-scratch tokenizer is trained on "
                "the manifest's captions, run `sfumato ingest` first"
            )
        tokenizer = train_tokenizer(manifest_captions(manifest), text_cfg.vocab_size, text_cfg.max_length)
        if len(tokenizer) <= 3:
            raise ValueError(
                f"{manifest} has no captions to train a tokenizer on: give the sources "
                "captions (e.g. a folder source's caption_template) or use conditioning: class"
            )
    tmp = folder.with_name(folder.name + ".tmp")
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return tokenizer


def load_run_tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(RunFolder(run_dir).tokenizer)


# train.text.encoder -> (transformers class, the config.json model_types it loads). A full
# CLIPModel folder (model_type clip) holds a text tower CLIPTextModel loads; a T5 seq2seq
# checkpoint (T5ForConditionalGeneration) holds the encoder T5EncoderModel loads, decoder ignored.
ENCODERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clip": ("CLIPTextModel", ("clip_text_model", "clip")),
    "t5": ("T5EncoderModel", ("t5",)),
}


def check_encoder(text_cfg) -> None:
    """A pretrained encoder's config.json must hold the class train.text.encoder names: loading
    a T5 checkpoint as CLIPTextModel (or the reverse) would build a random model and warn."""
    from transformers import PretrainedConfig

    where = f"train.text.pretrained={text_cfg.pretrained!r}" + (
        f" (encoder_subfolder {text_cfg.encoder_subfolder!r})" if text_cfg.encoder_subfolder else ""
    )
    try:
        found, _ = PretrainedConfig.get_config_dict(text_cfg.pretrained, subfolder=text_cfg.encoder_subfolder or "")
    except OSError as err:
        raise ValueError(f"{where} has no readable config.json: {err}") from None
    model_type = found.get("model_type")
    class_name, model_types = ENCODERS[text_cfg.encoder]
    if model_type not in model_types:
        fits = [kind for kind, (_, types) in ENCODERS.items() if model_type in types]
        hint = f"set train.text.encoder: {fits[0]}" if fits else f"sfumato loads {sorted(ENCODERS)} only"
        raise ValueError(
            f"train.text.encoder: {text_cfg.encoder} loads a {class_name}, but {where} is model_type "
            f"{model_type!r} (architectures {found.get('architectures')}): {hint}"
        )


def build_text_encoder(text_cfg, tokenizer) -> torch.nn.Module:
    """The pretrained encoder (safetensors weights only), or a fresh CLIPTextModel sized by the
    config. A frozen one (train_encoder: false) takes no gradients and stays in eval mode inside
    the Denoiser (sfumato.models.registry), so its dropout (T5's dropout_rate is 0.1) is off."""
    import transformers

    if text_cfg.pretrained:
        check_encoder(text_cfg)
        model_class = getattr(transformers, ENCODERS[text_cfg.encoder][0])
        # T5 with eager attention: torch.onnx (dynamo, torch 2.13) cannot decompose the reshape
        # after its SDPA attention, so `sfumato export` could not trace it; the arithmetic is the
        # same, and the scores are only [heads, L, L] for L = max_length.
        attention = {"attn_implementation": "eager"} if text_cfg.encoder == "t5" else {}
        # fp32 whatever the checkpoint holds (transformers 5 loads the stored dtype, and Stable
        # Diffusion repos store fp16): the run's precision decides, as for the VAE, and T5's
        # activations overflow fp16 (transformers clamps them there).
        encoder = model_class.from_pretrained(
            text_cfg.pretrained,
            subfolder=text_cfg.encoder_subfolder or "",
            use_safetensors=True,
            dtype=torch.float32,
            **attention,
        )
    else:
        encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_cfg.hidden_size,
                intermediate_size=4 * text_cfg.hidden_size,
                num_hidden_layers=text_cfg.num_layers,
                num_attention_heads=text_cfg.num_heads,
                max_position_embeddings=text_cfg.max_length,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    encoder.requires_grad_(text_cfg.train_encoder)
    if not text_cfg.train_encoder:
        encoder.eval()
    return encoder


def states_width(encoder: torch.nn.Module) -> int:
    """The width of the encoder's last hidden states: the UNet's cross-attention width
    (CLIPTextConfig.hidden_size, T5Config.d_model)."""
    config = encoder.config
    return config.d_model if hasattr(config, "d_model") else config.hidden_size


def is_frozen(encoder: torch.nn.Module) -> bool:
    """No parameter of the encoder trains (train_encoder: false; LoRA adapters on it do train)."""
    return not any(p.requires_grad for p in encoder.parameters())


def tokenize(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length], padded and truncated (the end token kept)."""
    return tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
