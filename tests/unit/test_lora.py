"""LoRA adapters (sfumato.models.lora) on every denoiser family, without Ray: only the adapters
train, a fresh adapter changes nothing, merging keeps the function and the base's names, and
the exported adapter is what diffusers' own loader reads back into a SfumatoPipeline."""

import copy
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from sfumato.models.lora import add_lora, default_targets, merge_lora, save_adapter  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402


def _lora(rank=4, **kw):
    return types.SimpleNamespace(
        **{
            "rank": rank,
            "alpha": None,
            "dropout": 0.0,
            "target_modules": None,
            "conv": False,
            "text_encoder": False,
            **kw,
        }
    )


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 700]), torch.tensor([0, 3])


@pytest.mark.parametrize("name", ["unet-tiny", "unet-xs", "dit-tiny"])
def test_only_the_adapters_train_and_merging_keeps_the_function(name):
    torch.manual_seed(0)
    model = build_denoiser(name, 32, 3, 4).eval()  # eval: the DiT drops class labels at random in training
    base = copy.deepcopy(model)
    add_lora(model, _lora())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t, c = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, c), base(x, t, c)), "a fresh adapter (B = 0) must change nothing"
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = model(x, t, c)
        assert (adapted - base(x, t, c)).abs().max() > 1e-4
        merged = merge_lora(copy.deepcopy(model))
        assert [n for n, _ in merged.named_parameters()] == [n for n, _ in base.named_parameters()]
        torch.testing.assert_close(merged(x, t, c), adapted, atol=1e-5, rtol=1e-4)


def test_adapters_are_few_of_the_parameters_and_conv_widens_the_targets():
    model = build_denoiser("unet-xs", 32, 3, 4)
    linear, conv = default_targets(model.net, conv=False), default_targets(model.net, conv=True)
    assert set(linear) < set(conv) and "conv_in" not in conv and "conv_out" not in conv
    add_lora(model, _lora(rank=8))
    share = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    assert share < 0.05
    with pytest.raises(ValueError, match="finetune.lora.target_modules"):
        add_lora(build_denoiser("unet-tiny", 32, 3, 4), _lora(target_modules=["no_such_layer"]))


def test_the_saved_adapter_is_diffusers_lora_format_and_loads_into_a_sfumato_pipeline(tmp_path):
    from diffusers import DDIMScheduler
    from safetensors import safe_open

    from sfumato.diffusion.pipeline import SfumatoPipeline

    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", 32, 3, 4)
    base = copy.deepcopy(model)
    add_lora(model, _lora())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path, _lora())
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() and "lora_adapter_metadata" in f.metadata()
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    pipe = SfumatoPipeline(unet=base.net, scheduler=DDIMScheduler())
    pipe.load_lora_weights(str(tmp_path))
    x, t, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, class_labels=c).sample, model(x, t, c), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_text_encoder_adapters_train_with_the_unets_and_the_rest_stays_frozen(kind):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if kind == "clip":
        config = CLIPTextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
        )
        encoder = CLIPTextModel(config)
    else:
        encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    model = build_denoiser("unet-text-tiny", 16, 3, text_encoder=encoder)
    add_lora(model, _lora(text_encoder=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    text = [n for n in trainable if n.startswith("text_encoder.")]
    assert len(text) == 2 * 4 and any(n.startswith("net.") for n in trainable), "A and B on q, k, v and out"
    assert all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="finetune.lora.text_encoder"):
        add_lora(build_denoiser("unet-tiny", 16, 3, 4), _lora(text_encoder=True))
