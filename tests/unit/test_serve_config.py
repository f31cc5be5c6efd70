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
