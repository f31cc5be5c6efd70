"""Text conditioning without Ray: a tokenizer trained on real captions, a CLIP text encoder
trained jointly with a text-conditional UNet, and the pretrained path (hub id or local folder)
loading exactly the saved weights. Tiny random configs of the real classes; no downloads."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers  # noqa: E402
from helpers import plain_state  # noqa: E402
from sfumato.config import TextConfig  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402
from sfumato.models.text import build_text_encoder, prepare_tokenizer, tokenize, train_tokenizer  # noqa: E402
from sfumato.train.step import conditions, train_step  # noqa: E402

TINY = TextConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, max_length=12)


@pytest.fixture(scope="module")
def cifar_text_batch(cifar_dir):
    return helpers.cifar_batch(cifar_dir, 0, 24)


@pytest.fixture(scope="module")
def tokenizer(cifar_dir):
    classes = sorted({p.parent.name for p in cifar_dir.rglob("*.jpg")})
    captions = [f"a photo of a {c}" for c in classes for _ in range(5)] + ["A Photo of an Airplane, in the SKY"]
    return train_tokenizer(captions, TINY.vocab_size, TINY.max_length)


def test_trained_tokenizer_round_trips_and_frames_every_caption(tokenizer):
    ids = tokenize(tokenizer, ["a photo of a truck", "", "zebra crossing ünïcode " * 20], TINY.max_length)
    assert ids.shape == (3, TINY.max_length)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (ids[:, 0] == bos).all()
    for row in ids.tolist():
        assert eos in row, "truncation must keep the end token"
        end = row.index(eos)
        assert all(tok == pad for tok in row[end + 1 :])
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a photo of a truck"
    assert ids[1].tolist()[:2] == [bos, eos], "the empty caption is the CFG null condition"
    # Byte-level: words never seen in training still encode (no unknown token), lower-cased.
    assert tokenizer.decode(tokenize(tokenizer, ["ZEBRA"], TINY.max_length)[0], skip_special_tokens=True) == "zebra"


def _text_state(model, tok, dropout=0.1):
    return plain_state(model, condition_dropout=dropout, tokenizer=tok, max_length=TINY.max_length)


def test_text_encoder_trains_jointly_and_the_loss_falls(tokenizer, cifar_text_batch):
    torch.manual_seed(0)
    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=build_text_encoder(TINY, tokenizer))
    encoder_before = [p.detach().clone() for p in model.text_encoder.parameters()]
    state = _text_state(model, tokenizer)
    losses = [train_step(state, cifar_text_batch)["loss"] for _ in range(50)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    changed = sum(not torch.equal(a, b) for a, b in zip(encoder_before, model.text_encoder.parameters()))
    assert changed == len(encoder_before), "every text-encoder tensor is trained with the denoiser"


def test_caption_dropout_substitutes_the_empty_caption(tokenizer, cifar_text_batch):
    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=build_text_encoder(TINY, tokenizer))
    classes = torch.as_tensor(cifar_text_batch["class"])
    empty = tokenize(tokenizer, [""], TINY.max_length)[0]
    all_dropped = conditions(cifar_text_batch, classes, _text_state(model, tokenizer, dropout=1.0))
    assert all(torch.equal(row, empty) for row in all_dropped)
    none_dropped = conditions(cifar_text_batch, classes, _text_state(model, tokenizer, dropout=0.0))
    assert torch.equal(none_dropped, tokenize(tokenizer, cifar_text_batch["caption"], TINY.max_length))
    # The caption reaches the prediction: two prompts, same noise, different outputs.
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    out = model(
        x[:1].repeat(2, 1, 1, 1), t, tokenize(tokenizer, ["a photo of a cat", "a photo of a ship"], TINY.max_length)
    )
    assert not torch.allclose(out[0], out[1])


def test_pretrained_folder_loads_the_saved_weights_and_can_stay_frozen(tmp_path, tokenizer, cifar_text_batch):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    source = tmp_path / "clip"
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    encoder.save_pretrained(source / "text_encoder")  # safetensors: the only format the loader accepts
    tokenizer.save_pretrained(source / "tokenizer")
    cfg = TextConfig(
        pretrained=str(source),
        encoder_subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
        train_encoder=False,
        max_length=TINY.max_length,
    )
    run = tmp_path / "run"
    loaded_tok = prepare_tokenizer(cfg, tmp_path / "no-manifest-needed.parquet", run)
    assert (run / "text" / "tokenizer" / "tokenizer_config.json").exists(), "the run keeps its own tokenizer"
    assert loaded_tok("a photo of a dog").input_ids == tokenizer("a photo of a dog").input_ids
    loaded = build_text_encoder(cfg, loaded_tok)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), loaded.state_dict().values()))
    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=loaded)
    state = _text_state(model, loaded_tok)
    unet_before = [p.detach().clone() for p in model.net.parameters()]
    for _ in range(3):
        train_step(state, cifar_text_batch)
    assert all(
        torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), model.text_encoder.state_dict().values())
    ), "train_encoder: false keeps the pretrained encoder as it was"
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, model.net.parameters()))


def test_text_models_and_text_conditioning_go_together():
    from pydantic import ValidationError

    from sfumato.config import TrainConfig

    base = {"output_dir": "/tmp/x", "stages": [{"resolution_px": 16, "steps": 1, "micro_batch_size": 1}]}
    with pytest.raises(ValidationError, match="text conditioning needs a text model \\(dit-text-b, "):
        TrainConfig.model_validate({**base, "model": "unet-tiny", "conditioning": "text"})
    with pytest.raises(ValidationError, match="does not fit model 'unet-text-tiny'"):
        TrainConfig.model_validate({**base, "model": "unet-text-tiny", "conditioning": "class"})
    with pytest.raises(ValidationError, match="train_encoder: false needs a pretrained encoder"):
        TextConfig(train_encoder=False)


# ------------------------------------------------------------- frozen pretrained encoders
ENCODER_CLASSES = {"clip": "CLIPTextModel", "t5": "T5EncoderModel"}


@pytest.fixture(scope="module", params=sorted(ENCODER_CLASSES))
def frozen_source(request, tmp_path_factory):
    """(kind, folder, saved encoder): a tiny random CLIPTextModel or T5EncoderModel (width 32, 2
    layers) with its tokenizer, saved as a Stable-Diffusion-style pretrained folder."""
    from sfumato.testing.tiny import save_tiny_text_encoder

    folder = tmp_path_factory.mktemp(f"pretrained-{request.param}")
    return request.param, folder, save_tiny_text_encoder(folder, request.param)


def _frozen_cfg(kind: str, folder, **fields) -> TextConfig:
    return TextConfig(
        encoder=kind,
        pretrained=str(folder),
        encoder_subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
        train_encoder=False,
        max_length=TINY.max_length,
        **fields,
    )


def _load(kind: str, folder, run_dir):
    """The tokenizer and encoder as a run loads them: the tokenizer copied into the run folder."""
    cfg = _frozen_cfg(kind, folder)
    tokenizer = prepare_tokenizer(cfg, run_dir / "no-manifest-needed.parquet", run_dir)
    return cfg, tokenizer, build_text_encoder(cfg, tokenizer)


def test_a_frozen_pretrained_encoder_conditions_the_unet_and_never_changes(frozen_source, tmp_path, cifar_text_batch):
    """Loaded by its class from the folder (safetensors), it sets the UNet's cross-attention
    width, takes no gradients, holds no optimizer state or EMA copy, keeps its dropout off while
    the denoiser trains, and is exactly the saved encoder after training; the UNet learns."""
    from sfumato.train.ema import EMA

    kind, folder, saved = frozen_source
    _, tokenizer, encoder = _load(kind, folder, tmp_path / "run")
    assert type(encoder).__name__ == ENCODER_CLASSES[kind]
    torch.manual_seed(0)
    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=encoder)
    assert model.net.config.cross_attention_dim == 32, "the encoder's width (T5: d_model)"
    state = _text_state(model, tokenizer)
    optimized = {id(p) for group in state.engine.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in encoder.parameters()}, "no optimizer state for the frozen encoder"
    ema = EMA(model, 0.9)
    assert not [n for n in ema.names if n.startswith("text_encoder.")], "no averaged copy of it"
    unet_before = [p.detach().clone() for p in model.net.parameters()]
    model.train()
    assert model.net.training and not encoder.training, "its dropout stays off (T5's rate is 0.1)"
    losses = [float(train_step(state, cifar_text_batch)["loss"]) for _ in range(3)]
    ema.update(model)
    assert np.isfinite(losses).all()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), encoder.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, model.net.parameters()))
    averaged = ema.state_dict(model)
    assert all(torch.equal(averaged[f"text_encoder.{n}"], p) for n, p in saved.named_parameters()), (
        "the checkpoint's EMA weights still hold the encoder (export reads them)"
    )


def test_the_cache_holds_the_frozen_encoders_own_states(frozen_source, tmp_path, cifar_dir):
    """The cache stage's builder (CacheEncoder, without Ray) on a real shard: each caption's
    states, and the empty caption's, are what the encoder gives inside the training denoiser;
    the training step's conditions are read from them."""
    from helpers import cache_row, caption_shard
    from sfumato.data.loader import iter_batches
    from sfumato.layout import CacheFolder, read_json
    from sfumato.models.cache import TEXT_EMPTY, TEXT_STATES, CacheEncoder, LatentCache, ShardEntry

    kind, folder, _ = frozen_source
    shard = tmp_path / "shard-000000.tar"
    captions = caption_shard(shard, cifar_dir)
    cfg, tokenizer, encoder = _load(kind, folder, tmp_path / "run")
    cache_dir = CacheFolder(tmp_path / "cache")
    CacheEncoder(None, cfg, "float32", 5, str(cache_dir.root))(cache_row(shard))
    sidecar = read_json(CacheFolder.sidecar(cache_dir.shard(16, 0)))
    assert sidecar["shapes"] == {"text_states": [TINY.max_length, 32]}, "text only: no latents without a VAE"
    batch = LatentCache(cache_dir, [ShardEntry(shard, 16, 0, "abc")], [sidecar]).attach(
        next(iter_batches([shard], 12, 16))
    )

    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=encoder).train()
    with torch.no_grad():
        direct = model.text_encoder(input_ids=tokenize(tokenizer, captions + [""], TINY.max_length)).last_hidden_state
    np.testing.assert_allclose(batch[TEXT_STATES], direct[:-1].numpy(), atol=1e-6)
    np.testing.assert_allclose(batch[TEXT_EMPTY], direct[-1:].numpy(), atol=1e-6)
    cond = conditions(batch, torch.as_tensor(batch["class"]), _text_state(model, tokenizer, dropout=0.0))
    assert cond.is_floating_point() and torch.equal(cond, torch.as_tensor(batch[TEXT_STATES])), "states, not ids"


def test_the_export_of_a_frozen_encoder_run_takes_prompts_in_diffusers(frozen_source, tmp_path):
    """The diffusers folder holds the encoder (safetensors) and tokenizer of its class and,
    loaded without sfumato, generates from prompt= what the run's own pipeline does."""
    import json

    from diffusers import DiffusionPipeline

    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.pipeline import SfumatoPipeline
    from sfumato.diffusion.sample import make_sampler
    from sfumato.export.diffusers_folder import write_diffusers

    kind, folder, _ = frozen_source
    _, tokenizer, encoder = _load(kind, folder, tmp_path / "run")
    torch.manual_seed(0)
    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=encoder).eval()
    pipe = SfumatoPipeline(
        unet=model.net,
        scheduler=make_sampler(DiffusionConfig(), "ddim", 16),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_max_length=TINY.max_length,
    )
    out = write_diffusers(pipe, tmp_path / "export", {"run": "frozen"})
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["transformers", ENCODER_CLASSES[kind]]
    assert (out / "text_encoder" / "model.safetensors").exists()
    loaded = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    prompts = ["a photo of a frog", "a photo of a ship"]
    images = []
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        run = dict(prompt=prompts, num_inference_steps=3, guidance_scale=3.0, generator=generators, output_type="np")
        images.append(p(**run).images)
    np.testing.assert_allclose(images[1], images[0], atol=1e-5)
    assert not np.allclose(images[0][0], images[0][1]), "the prompt reaches the images"


def test_a_half_precision_checkpoint_loads_in_float32(frozen_source, tmp_path):
    """Stable Diffusion repos store their encoders in fp16; the run's precision decides."""
    import copy

    kind, folder, saved = frozen_source
    copy.deepcopy(saved).half().save_pretrained(tmp_path / "text_encoder")
    encoder = build_text_encoder(_frozen_cfg(kind, tmp_path), None)
    assert encoder.dtype == torch.float32
    assert all(torch.equal(a, b.half().float()) for a, b in zip(encoder.parameters(), saved.parameters()))


def test_the_encoder_class_is_checked_against_the_checkpoint(frozen_source, tmp_path):
    from pydantic import ValidationError

    kind, folder, _ = frozen_source
    other = "t5" if kind == "clip" else "clip"
    with pytest.raises(
        ValueError,
        match=f"train.text.encoder: {other} loads a {ENCODER_CLASSES[other]}.*set train.text.encoder: {kind}",
    ):
        build_text_encoder(_frozen_cfg(other, folder), None)
    with pytest.raises(ValidationError, match="train.text.encoder: t5 needs train.text.pretrained"):
        TextConfig(encoder="t5")
