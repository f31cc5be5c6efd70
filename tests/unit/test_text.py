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
    with pytest.raises(ValidationError, match="text conditioning needs a \\*-text-\\* model"):
        TrainConfig.model_validate({**base, "model": "unet-tiny", "conditioning": "text"})
    with pytest.raises(ValidationError, match="does not fit model 'unet-text-tiny'"):
        TrainConfig.model_validate({**base, "model": "unet-text-tiny", "conditioning": "class"})
    with pytest.raises(ValidationError, match="train_encoder: false needs a pretrained encoder"):
        TextConfig(train_encoder=False)
