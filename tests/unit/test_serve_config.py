"""serve/config.yaml is a valid Ray Serve config whose args are valid sfumato ServeSettings, and the
request schema carries the model's bounds."""

from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")

from sfumato.serve.app import ServeSettings, request_model  # noqa: E402
from sfumato.serve.backends import ModelInfo  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def test_the_serve_config_validates_as_ray_serve_and_sfumato_settings():
    from ray.serve.schema import ServeDeploySchema

    tree = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(tree)
    (app,) = schema.applications
    assert app.import_path == "sfumato.serve.app:build_app"
    settings = ServeSettings(**app.args)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Generator", "Ingress"}
    assert settings.max_ongoing_requests >= settings.max_batch_size, "a replica must take a whole batch"
    # The Generator's limits come from args alone: written under `deployments:` too, they would
    # override the args and the two could disagree.
    generator = deployments["Generator"].model_dump(exclude_unset=True)
    assert not {"max_ongoing_requests", "max_queued_requests"} & set(generator), generator
    for d in deployments.values():
        assert d.health_check_period_s > 0 and d.health_check_timeout_s > 0


def test_the_request_schema_bounds_every_field_by_the_model_and_settings():
    info = ModelInfo("m", "torch", "text", [], ["ddim", "dpm-solver++"], 64, 8)
    Request = request_model(info, ServeSettings(model="x", max_steps=50, max_images=2, max_prompt_chars=20))
    ok = Request(prompt="a cat", steps=50, num_images=2, width=128, height=8)
    assert ok.sampler == "dpm-solver++" and ok.guidance_scale == 1.0
    from pydantic import ValidationError

    for field, value in [
        ("steps", 51),
        ("num_images", 3),
        ("prompt", "x" * 21),
        ("width", 136),
        ("width", 60),
        ("sampler", "ddpm"),
        ("class_label", 1),
    ]:
        with pytest.raises(ValidationError, match=field):
            Request(**{field: value})


def test_a_request_names_a_served_model_or_adapter_and_nothing_else():
    from pydantic import ValidationError

    info = ModelInfo("m", "torch", "class", ["cat", "dog"], ["ddim"], 32, 8)
    settings = ServeSettings(model="x", models={"v2": "y"}, adapters={"brand-look": "z"})
    Request = request_model(info, settings)
    assert Request().model == "base" and settings.model_names() == ["base", "v2", "brand-look"]
    assert Request(model="brand-look").model == "brand-look"
    for wrong in ("nope", "", 1, None):
        with pytest.raises(ValidationError, match="model"):
            Request(model=wrong)
    with pytest.raises(ValidationError, match="share a name"):
        ServeSettings(model="x", models={"base": "y"})
    with pytest.raises(ValidationError, match="adapters"):
        ServeSettings(model="x", adapters={"../up": "z"})


def test_a_second_model_must_take_the_same_requests():
    from sfumato.serve.app import check_compatible

    base = ModelInfo("m", "torch", "class", ["cat", "dog"], ["ddim"], 32, 8)
    check_compatible(base, ModelInfo("other-run", "torch", "class", ["cat", "dog"], ["ddim"], 32, 8), "v2")
    with pytest.raises(ValueError, match="models.v2: its class_names"):
        check_compatible(base, ModelInfo("m", "torch", "class", ["cat", "bird"], ["ddim"], 32, 8), "v2")
    with pytest.raises(ValueError, match="models.v2: its samplers"):
        check_compatible(base, ModelInfo("m", "torch", "class", ["cat", "dog"], ["flow-euler"], 32, 8), "v2")


def _text_request(max_tokens: int = 8, max_chars: int = 60):
    """The request schema of a text model whose tokenizer (a real BPE one, trained here) reads
    `max_tokens` tokens, start and end tokens included."""
    from sfumato.models.text import train_tokenizer
    from sfumato.serve.prompts import PromptTokens

    tokenizer = train_tokenizer(["a photo of a red circle", "a photo of a blue square"] * 4, 300, max_tokens)
    tokens = PromptTokens.from_transformers(tokenizer, max_tokens)
    info = ModelInfo("m", "torch", "text", [], ["ddim"], 32, 8)
    return request_model(info, ServeSettings(model="x", max_prompt_chars=max_chars), tokens), tokenizer


def test_a_text_model_takes_a_prompt_that_fits_its_tokenizer_and_refuses_every_other_naming_the_field():
    from pydantic import ValidationError

    Request, tokenizer = _text_request()
    assert Request(prompt="a red circle").prompt == "a red circle"
    assert Request(prompt="a red\tcircle\n", negative_prompt="").negative_prompt == "", "whitespace is text"
    fits = "a photo of a red circle"  # 6 words: 8 tokens with the start and end tokens
    assert len(tokenizer(fits).input_ids) == 8 and Request(prompt=fits).prompt == fits
    for body, field, says in [
        ({}, "prompt", "Field required"),
        ({"prompt": ""}, "prompt", "is empty"),
        ({"prompt": " \t\n"}, "prompt", "is empty"),
        ({"prompt": fits + " circle"}, "prompt", "9 tokens long"),
        ({"prompt": "a red circle", "negative_prompt": fits + " blue"}, "negative_prompt", "tokens long"),
        ({"prompt": "x" * 61}, "prompt", "at most 60 characters"),
        ({"prompt": 3}, "prompt", "valid string"),
        ({"prompt": ["a", "b"]}, "prompt", "valid string"),
        ({"prompt": [1, 2]}, "prompt", "valid string"),
        ({"prompt": None}, "prompt", "valid string"),
        ({"prompt": True}, "prompt", "valid string"),
        ({"prompt": "a red\x00circle"}, "prompt", "control character (U+0000) at position 5"),
        ({"prompt": "a\x1b[31m red"}, "prompt", "U+001B"),
        ({"prompt": "a red\x85circle"}, "prompt", "U+0085"),
        ({"prompt": "a \ud800 circle"}, "prompt", "nicode"),  # pydantic's own check, or ours
        ({"prompt": "a red circle", "class_label": 0}, "class_label", "not class-conditional (use prompt)"),
        ({"prompt": "a red circle", "class_label": "circle"}, "class_label", "not class-conditional"),
    ]:
        with pytest.raises(ValidationError) as refused:
            Request(**body)
        (error,) = refused.value.errors()
        assert error["loc"] == (field,) and says in error["msg"], (body, error)


def test_a_class_model_refuses_any_prompt_naming_the_field():
    from pydantic import ValidationError

    info = ModelInfo("m", "torch", "class", ["cat", "dog"], ["ddim"], 32, 8)
    Request = request_model(info, ServeSettings(model="x"))
    assert Request(class_label="dog").prompt is None
    for field, value in [("prompt", "a dog"), ("prompt", ""), ("negative_prompt", "blurry")]:
        with pytest.raises(ValidationError) as refused:
            Request(**{field: value})
        (error,) = refused.value.errors()
        assert error["loc"] == (field,) and "not text-conditional (use class_label)" in error["msg"]


def test_a_guidance_interval_is_two_noise_levels_in_order_and_anything_else_is_refused_naming_it():
    """As the request arrives (JSON, NaN and Infinity included): absent, guidance at every step;
    each malformed interval a validation error located at guidance_interval (a 422 naming it)."""
    from pydantic import ValidationError

    Request = request_model(ModelInfo("m", "torch", "class", ["cat", "dog"], ["ddim"], 32, 8), ServeSettings(model="x"))
    assert Request().guidance_interval is None
    assert Request.model_validate_json('{"guidance_interval": [0, 1]}').guidance_interval == (0.0, 1.0)
    assert Request.model_validate_json('{"guidance_interval": [0.3, 0.3]}').guidance_interval == (0.3, 0.3)
    assert Request.model_validate_json('{"guidance_interval": null}').guidance_interval is None
    for raw, says in [
        ("[0.5]", "2 numbers, not 1"),
        ("[0.1, 0.2, 0.3]", "2 numbers, not 3"),
        ("[]", "2 numbers, not 0"),
        ('["0.1", 0.5]', "valid number"),
        ("[true, 1]", "valid number"),
        ("[null, 0.5]", "valid number"),
        ("[[0.1], 0.5]", "valid number"),
        ("0.5", "valid array"),
        ('"0.2, 0.8"', "valid array"),
        ('{"lo": 0.2, "hi": 0.8}', "valid array"),
        ("[0.8, 0.2]", "0 <= lo <= hi <= 1"),
        ("[-0.1, 0.5]", "0 <= lo <= hi <= 1"),
        ("[0.5, 1.5]", "0 <= lo <= hi <= 1"),
        ("[NaN, 0.5]", "finite number"),
        ("[0.5, Infinity]", "finite number"),
        ("[0, 1e400]", "finite number"),
    ]:
        with pytest.raises(ValidationError) as refused:
            Request.model_validate_json(f'{{"guidance_interval": {raw}}}')
        errors = refused.value.errors()
        assert all(e["loc"][0] == "guidance_interval" for e in errors), (raw, errors)
        assert says in errors[0]["msg"], (raw, errors)
