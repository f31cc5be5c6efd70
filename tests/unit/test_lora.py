"""LoRA adapters (sfumato.models.lora) on every denoiser family (UNets, sfumato's DiT for class
and text, cross- or joint-attention), without Ray: only the adapters train, a fresh adapter
changes nothing, merging keeps the function and the base's names, and the exported adapter is
what diffusers' own loader reads back into a SfumatoPipeline."""

import copy
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from sfumato.diffusion.pipeline import predict  # noqa: E402
from sfumato.models.lora import add_lora, default_targets, merge_lora, save_adapter  # noqa: E402
from sfumato.models.names import TEXT_MODELS  # noqa: E402
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


def _tiny_clip():
    """A CLIP text encoder of width 32, one layer, 12 tokens (a vocabulary of 64)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
    )
    return CLIPTextModel(config)


def _model(name: str):
    """The named denoiser at 32 px, 4 classes or a tiny CLIP text encoder (12 tokens), in eval
    mode, its weights nudged off their initial values: a fresh DiT's adaLN-zero makes every
    block the identity and the output zero, which any adapter would trivially keep."""
    torch.manual_seed(0)
    if name in TEXT_MODELS:
        model = build_denoiser(name, 32, 3, text_encoder=_tiny_clip())
    else:
        model = build_denoiser(name, 32, 3, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _inputs(name: str = "unet-tiny"):
    """(noise, timesteps, condition): class labels, or token ids for a text model."""
    g = torch.Generator().manual_seed(0)
    cond = torch.randint(0, 64, (2, 12), generator=g) if name in TEXT_MODELS else torch.tensor([0, 3])
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 700]), cond


@pytest.mark.parametrize("name", ["unet-tiny", "unet-xs", "dit-tiny", "dit-text-tiny", "mmdit-tiny"])
def test_only_the_adapters_train_and_merging_keeps_the_function(name):
    model = _model(name)
    base = copy.deepcopy(model)
    add_lora(model, _lora())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t, c = _inputs(name)
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


@pytest.mark.parametrize("name", ["dit-tiny", "mmdit-tiny"])
def test_a_dits_adapters_reach_every_attention_and_mlp_layer_but_not_the_images_channels(name):
    """Every linear layer of every block (self-attention, cross- or joint-attention, the caption's
    own stream, SwiGLU, adaLN) is a default target; with `conv`, still neither the patch
    embedding nor the output projection, which read and write the image's channels."""
    net = _model(name).net
    in_blocks = {f"blocks.{n}" for n, m in net.blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = set(default_targets(net, conv=True))
    assert in_blocks and in_blocks <= targets and not targets & {"patch_embed", "proj_out"}
    assert any(".text_attn." in n for n in in_blocks) == (name == "mmdit-tiny")


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny", "mmdit-tiny"])
def test_the_saved_adapter_is_diffusers_lora_format_and_loads_into_a_sfumato_pipeline(name, tmp_path):
    """Network and (text models) text-encoder adapters written by save_adapter, read back by
    diffusers' load_lora_weights onto the base: the pipeline's network computes the adapted one."""
    from diffusers import DDIMScheduler
    from safetensors import safe_open

    from sfumato.diffusion.pipeline import SfumatoPipeline

    model = _model(name)
    base = copy.deepcopy(model)
    text = name in TEXT_MODELS
    add_lora(model, _lora(text_encoder=text, conv=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path, _lora(text_encoder=text, conv=True))
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() and "lora_adapter_metadata" in f.metadata()
    prefixes = ("unet.", "text_encoder.") if text else ("unet.",)
    assert keys and all(k.startswith(prefixes) and ".lora_" in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {p.rstrip(".") for p in prefixes}
    x, t, c = _inputs(name)
    with torch.no_grad():
        adapted = model(x, t, c)
        assert (adapted - base(x, t, c)).abs().max() > 1e-4
    pipe = SfumatoPipeline(unet=base.net, scheduler=DDIMScheduler(), text_encoder=base.text_encoder)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(predict(pipe.unet, x, t, c, pipe.text_encoder), adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_text_encoder_adapters_train_with_the_unets_and_the_rest_stays_frozen(kind):
    from transformers import T5Config, T5EncoderModel

    if kind == "clip":
        encoder = _tiny_clip()
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
