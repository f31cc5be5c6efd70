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

    for field, value in [("steps", 51), ("num_images", 3), ("prompt", "x" * 21), ("width", 136), ("width", 60),
                         ("sampler", "ddpm"), ("class_label", 1)]:
        with pytest.raises(ValidationError, match=field):
            Request(**{field: value})
