"""Text conditioning: a tokenizer and a CLIP text encoder (transformers' `CLIPTextModel`).

Either both are pretrained, loaded from a hub id or a local folder (safetensors only), or the
run is from scratch: a byte-level BPE tokenizer is trained with `tokenizers` on the manifest's
captions and a randomly initialised `CLIPTextModel` of the configured size is trained jointly
with the denoiser. Either way the run folder keeps its own copy of the tokenizer
(`text/tokenizer/`), so a resumed or exported run never depends on where it came from.
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


def build_text_encoder(text_cfg, tokenizer) -> torch.nn.Module:
    """The pretrained encoder (safetensors weights only), or a fresh one sized by the config."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if text_cfg.pretrained:
        encoder = CLIPTextModel.from_pretrained(
            text_cfg.pretrained, subfolder=text_cfg.encoder_subfolder or "", use_safetensors=True
        )
    else:
        encoder = CLIPTextModel(
            CLIPTextConfig(
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
    return encoder


def tokenize(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length], padded and truncated (the end token kept)."""
    return tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
