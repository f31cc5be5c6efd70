"""The Serve endpoint, started for real on 127.0.0.1 around the exported debug runs, spoken to over
HTTP: images, validation, auth, overload, timeouts, the ONNX backend, a flow-matching model and a
text-conditional one (prompts) on both backends."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from helpers import REPO, exported  # noqa: E402

TOKEN = "test-token-123"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Capacity 2 running + 2 queued: small enough that a test can exceed it.
COMMON = dict(
    token_env="SFUMATO_TEST_TOKEN",
    request_timeout_s=120.0,
    max_steps=1000,
    max_images=8,
    max_batch_size=2,
    max_ongoing_requests=2,
    max_queued_requests=2,
)


@pytest.fixture(scope="module")
def serve_port(monkeypatch_module, flow_run, text_run):
    """One Serve HTTP proxy on this port for every app of the module, shut down after the last.
    The flow and text runs train first: once the Serve replicas hold both CPUs, Ray Train could
    not start (the module run alone would hang in flow_server's or text_server's training)."""
    from ray import serve

    monkeypatch_module.setenv("SFUMATO_TEST_TOKEN", TOKEN)
    yield _free_port()
    serve.shutdown()


@pytest.fixture(scope="module")
def server(straight, serve_port):
    from sfumato.serve.app import ServeSettings, run_server

    common = dict(model=str(exported(straight)), **COMMON)
    run_server(ServeSettings(**common, models={"twin": common["model"]}), port=serve_port, blocking=False)
    run_server(
        ServeSettings(**common, backend="onnx"), port=serve_port, blocking=False, name="onnx", route_prefix="/onnx"
    )
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def flow_server(flow_run, serve_port):
    """The flow run's export on both backends, as two more apps beside the DDPM ones. Their model
    replicas reserve no CPU: the DDPM apps' replicas hold the session's two."""
    from sfumato.serve.app import ServeSettings, run_server

    common = dict(model=str(exported(flow_run)), num_cpus=0, **COMMON)
    for backend in ("torch", "onnx"):
        run_server(
            ServeSettings(**common, backend=backend),
            port=serve_port,
            blocking=False,
            name=f"flow-{backend}",
            route_prefix=f"/flow-{backend}",
        )
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def text_server(text_run, serve_port):
    """The text run's export (its own tokenizer: 12 tokens) on both backends, at /text-torch and
    /text-onnx; their replicas reserve no CPU, as flow_server's."""
    from sfumato.serve.app import ServeSettings, run_server

    common = dict(model=str(exported(text_run)), num_cpus=0, **COMMON)
    for backend in ("torch", "onnx"):
        run_server(
            ServeSettings(**common, backend=backend),
            port=serve_port,
            blocking=False,
            name=f"text-{backend}",
            route_prefix=f"/text-{backend}",
        )
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def safe_server(straight, server, serve_port, tmp_path_factory):
    """The class run's export behind the output safety filter (a tiny CLIP), at /safe. The filter's
    scores of seeds 20..27 are computed here first, and the threshold put in the widest gap
    between them: some of those images are flagged, the others pass."""
    from sfumato.serve.app import ServeSettings, run_server
    from sfumato.serve.backends import Job, TorchBackend
    from sfumato.serve.safety import OutputFilter
    from sfumato.testing.tiny import save_tiny_clip

    clip = tmp_path_factory.mktemp("safety-clip")
    save_tiny_clip(clip)
    export = exported(straight)
    images = TorchBackend(export).generate([Job("offline", **SAFE_JOB)])[0]
    defaults = ServeSettings(model=str(export))
    scores = sorted(
        v.score
        for _, v in OutputFilter(
            str(clip), 1.0, "withhold", defaults.safety_unsafe_prompts, defaults.safety_safe_prompts
        )(images)
    )
    gap = max(range(len(scores) - 1), key=lambda k: scores[k + 1] - scores[k])
    threshold = (scores[gap] + scores[gap + 1]) / 2
    run_server(
        ServeSettings(
            model=str(export), **{**COMMON, "num_cpus": 0}, safety_model=str(clip), safety_threshold=threshold
        ),
        port=serve_port,
        blocking=False,
        name="safe",
        route_prefix="/safe",
    )
    return server, threshold


SAFE_JOB = dict(seed=20, steps=4, guidance_scale=1.0, num_images=8, sampler="ddim", width=32, height=32, class_label=1)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _generate(url, body, headers=HEADERS, route="", **kwargs):
    return requests.post(f"{url}{route}/v1/generate", json=body, headers=headers, timeout=60, **kwargs)


def test_a_request_returns_a_png_of_the_asked_size_and_a_seed_repeats_it(server):
    first = _generate(server, {"seed": 7, "steps": 4, "class_label": "airplane", "width": 64, "height": 64})
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png" and first.headers["x-seed"] == "7"
    assert Image.open(io.BytesIO(first.content)).size == (64, 64)
    again = _generate(server, {"seed": 7, "steps": 4, "class_label": 0, "width": 64, "height": 64})
    assert again.content == first.content, "same seed, same class (by name or index): the same bytes"
    other = _generate(server, {"seed": 8, "steps": 4, "class_label": 0, "width": 64, "height": 64})
    assert other.content != first.content

    several = _generate(
        server,
        {"seed": 7, "steps": 4, "class_label": 0, "num_images": 3, "width": 64, "height": 64},
        headers={**HEADERS, "Accept": "application/json"},
    )
    assert several.status_code == 200 and several.headers["content-type"] == "application/json", several.text
    body = several.json()
    assert body["seeds"] == [7, 8, 9]
    images = [base64.b64decode(x) for x in body["images"]]
    assert images[0] == first.content and images[1] == other.content, "image k of seed s is seed s + k's image"


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 1001),
        ("steps", 0),
        ("num_images", 9),
        ("width", 33),
        ("height", 1024),
        ("sampler", "euler"),
        ("sampler", "flow-euler"),
        ("seed", -1),
        ("guidance_scale", 100),
        ("class_label", "unicorn"),
        ("class_label", 10),
        ("prompt", "a dog"),
        ("prompt", ""),
        ("negative_prompt", "blurry"),
        ("colour", "red"),
        ("timeout_s", 121),
        ("guidance_interval", [0.8, 0.2]),
        ("guidance_interval", [-0.1, 0.5]),
        ("guidance_interval", [0.5, 1.5]),
        ("guidance_interval", [0.5]),
        ("guidance_interval", [0.1, 0.5, 0.9]),
        ("guidance_interval", ["low", "high"]),
        ("guidance_interval", [True, 1]),
        ("guidance_interval", 0.5),
    ],
)
def test_each_invalid_field_is_a_422_naming_it(server, field, value):
    response = _generate(server, {"steps": 2, field: value})
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"]), response.text


def _malformed_bodies(count: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(what, raw body, content type): a valid body with one field made hostile, or a broken body.
    Raw bytes, because NaN, Infinity, 1e400, lone surrogates and invalid UTF-8 are what clients
    send and what `json=` would refuse to write. The server's model is class-conditional, so a
    prompt of any kind is invalid too."""
    import random

    rng = random.Random(seed)
    anything = [
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1" + "0" * 400,
        "-" + "9" * 50,
        "[]",
        "{}",
        "[1, 2]",
        '{"a": 1}',
        '"x"',
        '"\\ud800"',
        '"\\udfff\\ud800"',
        "-1",
        "[" * 5000 + "]" * 5000,
        '"' + "a" * 2_000_000 + '"',
    ]
    per_field = {
        "steps": ["1.5"],
        "seed": ["1.5"],
        "num_images": ["1.5"],
        "width": ["1.5"],
        "height": ["1.5"],
        "guidance_scale": [],
        "guidance_interval": ["[NaN, 0.5]", "[0.2, Infinity]", "[1e400, 0]", "[0.9, 0.1]", "[0.5]", "[true, 1]"],
        "timeout_s": [],
        "class_label": ["1.5", "true", '"\\u0000"'],
        "prompt": ["true", '"a dog"', '"\\u0000"'],
        "negative_prompt": ["1.5", '"blurry"'],
        "sampler": ["1.5", "true", '"\\u0000"', '"DDIM"'],
    }
    cases = []
    for _ in range(count):
        field = rng.choice(sorted(per_field))
        value = rng.choice(anything + per_field[field])
        cases.append((f"{field}={value[:24]}", f'{{"steps": 2, "{field}": {value}}}'.encode(), "application/json"))
    cases += [
        ("top-level NaN", b"NaN", "application/json"),
        ("top-level list", b"[]", "application/json"),
        ("top-level string", b'"steps"', "application/json"),
        ("empty body", b"", "application/json"),
        ("truncated", b'{"steps": 2', "application/json"),
        ("invalid UTF-8", b'{"prompt": "\xff\xfe\xfd"}', "application/json"),
        ("invalid UTF-8 key", b'{"\xc3\x28": 1}', "application/json"),
        ("nested body", b'{"steps": {"steps": {"steps": 2}}}', "application/json"),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "application/json"),
        ("form", b"steps=2", "application/x-www-form-urlencoded"),
        ("text", b'{"steps": 2}', "text/plain"),
        ("binary", bytes(range(256)) * 64, "application/octet-stream"),
        ("duplicate keys", b'{"steps": 2, "steps": NaN}', "application/json"),
    ]
    return cases


def test_no_malformed_body_ends_in_a_500_and_the_server_serves_afterwards(server):
    """The fuzz property: every hostile body gets a 4xx with a JSON detail (never a 500, never an
    echo of the value); afterwards the endpoint still generates."""
    answers = {}
    for what, raw, content_type in _malformed_bodies(160):
        response = requests.post(
            f"{server}/v1/generate", data=raw, timeout=60, headers={**HEADERS, "Content-Type": content_type}
        )
        answers[what] = response.status_code
        assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
        assert "detail" in response.json(), what
        assert len(response.content) < 20_000, f"{what}: the answer echoes the input ({len(response.content)} bytes)"
    for field, value in (("guidance_scale", "NaN"), ("guidance_interval", "[0.2, NaN]")):
        named = requests.post(
            f"{server}/v1/generate",
            data=f'{{"steps": 2, "{field}": {value}}}'.encode(),
            timeout=60,
            headers={**HEADERS, "Content-Type": "application/json"},
        )
        assert named.status_code == 422 and field in json.dumps(named.json()["detail"]), named.text
    assert _generate(server, {"seed": 1, "steps": 2}).status_code == 200, (
        f"still serving after {len(answers)} bad bodies"
    )


def test_the_token_is_required_and_checked_before_validation(server):
    assert _generate(server, {"steps": 2}, headers={}).status_code == 401
    assert _generate(server, {"steps": 99999}, headers={}).status_code == 401, "no token: 401 before any 422"
    assert _generate(server, {"steps": 2}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{server}/v1/model", headers=HEADERS, timeout=30).json()
    assert (
        info["conditioning"] == "class"
        and info["default_size_px"] == 32
        and info["samplers"] == ["ddpm", "ddim", "dpm-solver++"]
    )
    assert info["limits"]["max_steps"] == 1000
    schema = requests.get(f"{server}/openapi.json", headers=HEADERS, timeout=30).json()
    assert schema["components"]["schemas"]["GenerateRequest"]["properties"]["steps"]["maximum"] == 1000


def test_a_deadline_stops_the_denoising_loop_mid_way(server):
    before = requests.get(f"{server}/v1/model", headers=HEADERS, timeout=30).json()["stats"]
    slow = _generate(server, {"seed": 1, "steps": 1000, "num_images": 8, "width": 64, "height": 64, "timeout_s": 2})
    assert slow.status_code == 408, slow.text
    for _ in range(60):  # the replica notices the deadline at its next step
        stats = requests.get(f"{server}/v1/model", headers=HEADERS, timeout=30).json()["stats"]
        if stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.5)
    assert stats["cancelled"] == before["cancelled"] + 1, stats
    assert stats["completed"] == before["completed"], "the timed-out job never ran to its end"
    assert _generate(server, {"seed": 1, "steps": 2}).status_code == 200, "the replica is free again"


def test_a_burst_beyond_capacity_is_refused_with_retry_after_and_nothing_breaks(server):
    body = {"steps": 300, "num_images": 4, "width": 64, "height": 64, "timeout_s": 2}
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda i: _generate(server, {**body, "seed": i}), range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 408, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    # 2 running + 2 queued are admitted; Serve's limits are enforced per router without a global
    # lock, and a slot freed by a 408 can admit a late arrival, so allow a little slack.
    assert len(refused) >= 12 // 2, f"a burst of 12 at a capacity of 2 + 2 is mostly refused: {statuses}"
    assert all(r.headers.get("retry-after") == "2" for r in refused)
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    assert _generate(server, {"seed": 1, "steps": 2}).status_code == 200


def test_a_request_picks_a_held_model_by_name_and_an_unknown_name_is_a_422(server):
    """The torch app holds the export twice, as `base` and `twin`: a name routes, a wrong one is refused."""
    info = requests.get(f"{server}/v1/model", headers=HEADERS, timeout=30).json()
    assert info["models"] == ["base", "twin"]
    body = {"seed": 11, "steps": 3, "class_label": 1}
    base = _generate(server, body)
    assert base.status_code == 200 and _generate(server, {**body, "model": "base"}).content == base.content
    twin = _generate(server, {**body, "model": "twin"})
    assert twin.status_code == 200 and twin.content == base.content, "the same export under another name"
    for wrong in ("nope", 3, ""):
        refused = _generate(server, {**body, "model": wrong})
        assert refused.status_code == 422 and "model" in json.dumps(refused.json()["detail"]), refused.text
    assert _generate(server, {**body, "model": "twin"}, route="/onnx").status_code == 422, "the ONNX app holds one"


def test_the_onnx_backend_serves_too(server):
    first = _generate(server, {"seed": 3, "steps": 4, "class_label": 2, "guidance_scale": 2}, route="/onnx")
    assert first.status_code == 200, first.text
    assert Image.open(io.BytesIO(first.content)).size == (32, 32)
    assert (
        _generate(server, {"seed": 3, "steps": 4, "class_label": 2, "guidance_scale": 2}, route="/onnx").content
        == first.content
    )
    wrong = _generate(server, {"seed": 3, "steps": 4, "sampler": "ddpm"}, route="/onnx")
    assert wrong.status_code == 422 and "sampler" in wrong.text, "the ONNX sampler is DDIM only"


def test_a_guidance_interval_limits_guidance_to_its_noise_levels_on_both_backends(server):
    """Four DDIM steps sit at noise levels 0.999, 0.749, 0.499 and 0.249: [0, 1] guides them all (the
    guided image, byte for byte), [0, 0] none (the unguided image), [0.3, 0.8] the middle two (an
    image unlike both). Requests with other intervals are never batched into one loop: each
    concurrent answer is the one it gets alone."""
    body = {"seed": 3, "steps": 4, "class_label": 2, "guidance_scale": 3, "sampler": "ddim"}
    for route in ("", "/onnx"):
        images = {}
        for name, extra in [
            ("guided", {}),
            ("all", {"guidance_interval": [0, 1]}),
            ("none", {"guidance_interval": [0, 0]}),
            ("unguided", {"guidance_scale": 1}),
            ("middle", {"guidance_interval": [0.3, 0.8]}),
        ]:
            response = _generate(server, {**body, **extra}, route=route)
            assert response.status_code == 200, (route, name, response.text)
            images[name] = response.content
        assert images["all"] == images["guided"] and images["none"] == images["unguided"], route
        assert images["guided"] != images["unguided"], "guidance changes this model's images: the test can tell"
        assert images["middle"] not in (images["guided"], images["unguided"]), route
        bodies = [{**body, "guidance_interval": interval} for interval in ([0, 0], [0.3, 0.8])]
        with ThreadPoolExecutor(max_workers=2) as pool:
            together = [pool.submit(_generate, server, b, route=route) for b in bodies]
        assert [f.result().content for f in together] == [images["none"], images["middle"]], route


def test_a_request_naming_no_guidance_gets_the_served_models_own(straight, server, serve_port, tmp_path):
    """An export records the guidance its run evaluated with; a request that leaves guidance out
    gets that model's (each model of the endpoint its own), one that names it gets its own, and
    `guidance_interval: null` still means every step."""
    from sfumato.layout import ExportFolder
    from sfumato.serve.app import ServeSettings, run_server
    from sfumato.serve.backends import OnnxBackend, TorchBackend

    plain = exported(straight)
    recorded = json.loads(ExportFolder(plain).meta.read_text())
    assert recorded["guidance_scale"] == 1.0, "configs/debug.yaml evaluates unguided, and the export says so"
    guided = tmp_path / "guided-export"
    shutil.copytree(plain, guided)
    own = {"guidance_scale": 3.0, "guidance_interval": [0.3, 0.8]}
    ExportFolder(guided).meta.write_text(json.dumps({**recorded, **own}))
    for backend in (TorchBackend(guided), OnnxBackend(guided)):
        info = backend.info()
        assert (info.guidance_scale, info.guidance_interval) == (3.0, (0.3, 0.8)), type(backend).__name__
    run_server(
        ServeSettings(model=str(guided), models={"plain": str(plain)}, num_cpus=0, **COMMON),
        port=serve_port,
        blocking=False,
        name="guided",
        route_prefix="/guided",
    )
    body = {"seed": 3, "steps": 4, "class_label": 2, "sampler": "ddim"}
    explicit = {"guidance_scale": 3, "guidance_interval": [0.3, 0.8]}
    middle = _generate(server, {**body, **explicit})
    every_step = _generate(server, {**body, "guidance_scale": 3})
    unguided = _generate(server, body)
    assert len({middle.content, every_step.content, unguided.content}) == 3, "the test can tell them apart"
    cases = [
        ({}, middle),
        (explicit, middle),
        ({"guidance_interval": None}, every_step),
        ({"guidance_scale": 1}, unguided),
        ({"model": "plain"}, unguided),
    ]
    for extra, expected in cases:
        response = _generate(server, {**body, **extra}, route="/guided")
        assert response.status_code == 200, (extra, response.text)
        assert response.content == expected.content, extra
    info = requests.get(f"{server}/guided/v1/model", headers=HEADERS, timeout=30).json()
    assert (info["guidance_scale"], info["guidance_interval"]) == (3.0, [0.3, 0.8])


def test_a_flow_model_is_served_by_both_backends_and_takes_only_flow_samplers(flow_server):
    body = {"seed": 5, "steps": 4, "class_label": "airplane", "guidance_scale": 2}
    for route, samplers in (("/flow-torch", ["flow-euler", "flow-heun"]), ("/flow-onnx", ["flow-euler"])):
        info = requests.get(f"{flow_server}{route}/v1/model", headers=HEADERS, timeout=30).json()
        assert info["samplers"] == samplers and info["backend"] == route.split("-")[1], info
        default = _generate(flow_server, body, route=route)
        assert default.status_code == 200, default.text
        assert Image.open(io.BytesIO(default.content)).size == (32, 32)
        images = {}
        for sampler in samplers:
            response = _generate(flow_server, {**body, "sampler": sampler}, route=route)
            assert response.status_code == 200, response.text
            images[sampler] = response.content
        assert images["flow-euler"] == default.content, "a flow model's default sampler is flow-euler"
        assert len(set(images.values())) == len(images), "Euler and Heun take different paths"
        for ddpm_sampler in ("ddim", "dpm-solver++"):
            wrong = _generate(flow_server, {**body, "sampler": ddpm_sampler}, route=route)
            assert wrong.status_code == 422 and "sampler" in json.dumps(wrong.json()["detail"]), wrong.text


TEXT_BODY = {"prompt": "a photo of a frog", "seed": 5, "steps": 2, "guidance_scale": 3.0}  # guided: negatives count


def test_a_text_model_draws_the_prompt_asked_for_on_both_backends(text_server, text_run):
    """The image of a prompt (and negative prompt) is the one the export's pipeline draws for it
    (same seed), a seed repeats it, another prompt or a negative prompt changes it; /v1/model says
    how long a prompt may be."""
    import numpy as np

    from sfumato.serve.backends import Job, load_backend

    for backend in ("torch", "onnx"):
        route = f"/text-{backend}"
        info = requests.get(f"{text_server}{route}/v1/model", headers=HEADERS, timeout=30).json()
        assert info["conditioning"] == "text" and info["limits"]["max_prompt_tokens"] == 12, info
        local = load_backend(exported(text_run), backend)
        sampler = info["samplers"][0] if backend == "onnx" else "dpm-solver++"
        answers = {}
        for name, body in {
            "prompt": TEXT_BODY,
            "other prompt": {**TEXT_BODY, "prompt": "a photo of a ship"},
            "negative prompt": {**TEXT_BODY, "negative_prompt": "a photo of a ship"},
        }.items():
            answer = _generate(text_server, body, route=route)
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
            answers[name] = answer.content
            job = Job("local", num_images=1, sampler=sampler, width=32, height=32, **body)
            drawn = local.generate([job])[0][0].astype(int)
            served = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
            assert np.abs(served - drawn).max() <= 1, f"{backend}, {name}: the served image is the pipeline's"
        assert _generate(text_server, TEXT_BODY, route=route).content == answers["prompt"]
        assert len(set(answers.values())) == 3, f"{backend}: the prompt and the negative prompt steer the image"


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "  \n "}, "prompt"),
        ({"prompt": "a photo of a frog " * 3}, "prompt"),  # 15 words: more tokens than the 12 the model reads
        ({"prompt": "a" * 501}, "prompt"),  # the character cap (max_prompt_chars)
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a photo of a frog"]}, "prompt"),
        ({"prompt": [1, 2]}, "prompt"),
        ({"prompt": {"text": "a frog"}}, "prompt"),
        ({"prompt": "a frog\u0000"}, "prompt"),
        ({"prompt": "a \u0007frog"}, "prompt"),
        ({"prompt": "a frog", "negative_prompt": 1.5}, "negative_prompt"),
        ({"prompt": "a frog", "negative_prompt": "blurry " * 12}, "negative_prompt"),
        ({"prompt": "a frog", "class_label": 0}, "class_label"),
        ({"prompt": "a frog", "class_label": "frog"}, "class_label"),
    ],
)
def test_a_text_model_refuses_a_bad_prompt_or_a_class_label_with_a_422_naming_the_field(text_server, body, field):
    response = _generate(text_server, {"steps": 2, **body}, route="/text-torch")
    assert response.status_code == 422, response.text
    assert [field] in [error["loc"][1:] for error in response.json()["detail"]], response.text
    if "frog " in str(body.get("prompt", "")):  # the ONNX app counts with the export's tokenizer.json
        onnx = _generate(text_server, {"steps": 2, **body}, route="/text-onnx")
        assert onnx.status_code == 422 and "tokens long" in onnx.text, onnx.text


def test_the_safety_filter_withholds_flagged_images_and_passes_the_others_unchanged(safe_server):
    server, threshold = safe_server
    body = {k: SAFE_JOB[k] for k in ("seed", "steps", "guidance_scale", "num_images", "sampler", "class_label")}
    json_headers = {**HEADERS, "Accept": "application/json"}
    filtered = _generate(server, body, route="/safe", headers=json_headers)
    assert filtered.status_code == 200, filtered.text
    answer = filtered.json()
    unfiltered = _generate(server, body, headers=json_headers).json()
    assert unfiltered["safety"] == [{"action": "unchecked", "score": None}] * 8 and unfiltered["withheld"] == []
    flagged = [k for k, v in enumerate(answer["safety"]) if v["score"] >= threshold]
    assert 0 < len(flagged) < 8, answer["safety"]
    assert answer["withheld"] == flagged
    for k, (image, verdict) in enumerate(zip(answer["images"], answer["safety"])):
        if k in flagged:
            assert image is None and verdict["action"] == "withheld", "no pixels of a flagged image leave"
        else:
            assert verdict["action"] == "passed" and image == unfiltered["images"][k], "a passed image is untouched"

    # One image as a PNG: a flagged one is a 451 naming its score, a passed one a PNG saying so.
    single = {**body, "num_images": 1}
    withheld = _generate(server, {**single, "seed": body["seed"] + flagged[0]}, route="/safe")
    assert withheld.status_code == 451 and withheld.headers["x-safety"] == "withheld", withheld.text
    assert "safety filter" in withheld.json()["detail"] and withheld.json()["withheld"] == [0]
    passed = next(k for k in range(8) if k not in flagged)
    png = _generate(server, {**single, "seed": body["seed"] + passed}, route="/safe")
    assert png.status_code == 200 and png.headers["x-safety"] == "passed", png.text
    assert base64.b64encode(png.content).decode() == unfiltered["images"][passed]

    on = requests.get(f"{server}/safe/v1/info", headers=HEADERS, timeout=30).json()
    assert on["safety"]["enabled"] and on["safety"]["threshold"] == threshold
    assert on["stats"]["withheld"] == len(flagged) + 1
    off = requests.get(f"{server}/v1/info", headers=HEADERS, timeout=30).json()["safety"]
    assert off["enabled"] is False and "no safety_model" in off["reason"], "a server without a filter says so"


MONITORING = REPO / "serve" / "monitoring"


def _scrape() -> dict[str, float]:
    """Every sample of Ray's Prometheus endpoint on this node, summed over label sets, keyed by
    name plus the `status`/`action` label where a sample has one."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text):
        for sample in family.samples:
            if not sample.name.startswith("ray_sfumato_"):
                continue
            tag = sample.labels.get("status") or sample.labels.get("action")
            for key in (sample.name, f"{sample.name}{{{tag}}}") if tag else (sample.name,):
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _scrape_until(ready, timeout_s: float = 90) -> dict[str, float]:
    """Ray's metrics agent exports every few seconds: poll until `ready(totals)`."""
    deadline = time.monotonic() + timeout_s
    while True:
        totals = _scrape()
        if ready(totals) or time.monotonic() > deadline:
            return totals
        time.sleep(2)


def _settled(window_s: float = 12, timeout_s: float = 90) -> dict[str, float]:
    """The totals once every replica has exported its latest values: unchanged over a window
    longer than Ray's export interval."""
    deadline, last = time.monotonic() + timeout_s, _scrape()
    while True:
        time.sleep(window_s)
        now = _scrape()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def _monitored_names() -> set[str]:
    """The metric names the alert rules and the Grafana dashboard query."""
    text = (MONITORING / "alerts.yml").read_text() + (MONITORING / "grafana-dashboard.json").read_text()
    return set(re.findall(r"ray_sfumato_[a-z_]+", text))


def test_every_metric_reads_back_and_grows_with_traffic_and_the_dashboards_name_only_real_ones(safe_server):
    """Runs after the module's other tests: their traffic (200s, 401, 403, 408, 422, 451, 503,
    withheld images) is what the metrics must show."""
    server, _ = safe_server
    expected = {
        "ray_sfumato_responses_total{200}",
        "ray_sfumato_responses_total{401}",
        "ray_sfumato_responses_total{403}",
        "ray_sfumato_responses_total{408}",
        "ray_sfumato_responses_total{422}",
        "ray_sfumato_responses_total{451}",
        "ray_sfumato_responses_total{503}",
        "ray_sfumato_safety_triggers_total{withheld}",
        *(
            f"ray_sfumato_{h}_count"
            for h in (
                "request_latency_s",
                "queue_wait_s",
                "denoise_s",
                "encode_s",
                "batch_requests",
                "safety_score",
                "image_brightness",
                "image_colourfulness",
            )
        ),
        "ray_sfumato_images_generated_total",
    }
    # A gauge is exported on the agent's own schedule, possibly later than the counters: wait for it too.
    _scrape_until(lambda t: expected <= {k for k, v in t.items() if v > 0} and "ray_sfumato_requests_in_flight" in t)
    before = _settled()
    missing = sorted(k for k in expected if before.get(k, 0) <= 0)
    assert not missing, f"not exported after traffic: {missing} (have {sorted(before)})"
    # Idle now: the gauge reads 0 (kept alive by the ingress; Ray's agent drops a gauge not set again).
    assert before.get("ray_sfumato_requests_in_flight") == 0

    # Four more images through the filter: every per-image count grows by 4, the loop counts by 1.
    body = {"seed": 40, "steps": 2, "num_images": 4, "class_label": 0}
    assert _generate(server, body, route="/safe", headers={**HEADERS, "Accept": "application/json"}).status_code == 200
    grows_by = {
        "ray_sfumato_images_generated_total": 4,
        "ray_sfumato_image_brightness_count": None,
        "ray_sfumato_safety_score_count": 4,
        "ray_sfumato_denoise_s_count": 1,
        "ray_sfumato_responses_total{200}": 1,
        "ray_sfumato_request_latency_s_count": 1,
    }
    after = _scrape_until(lambda t: all(t.get(k, 0) >= before[k] + (n or 1) for k, n in grows_by.items()))
    for name, n in grows_by.items():
        if n is None:  # withheld images are not measured for drift: 0..4 more
            assert before[name] <= after[name] <= before[name] + 4, name
        else:
            assert after[name] == before[name] + n, (name, before[name], after[name])

    # Idle past Ray's gauge time-to-live (two export intervals, after which its agent drops a gauge
    # nobody set again): the in-flight gauge must still be there, at 0, not "no data".
    import ray

    time.sleep(2 * max(ray._config.metrics_report_interval_ms(), 1000) / 1000 + 5)
    assert _scrape().get("ray_sfumato_requests_in_flight") == 0

    names = {re.sub(r"\{.*", "", k) for k in after}
    for name in _monitored_names():
        assert name in names or f"{name}_bucket" in names, (
            f"serve/monitoring names {name}, which the endpoint does not export"
        )


def test_the_alert_rules_are_valid_prometheus_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed: .ci/run installs Debian's prometheus package")
        pytest.skip("no promtool here (apt-get install prometheus)")
    checked = subprocess.run(
        [promtool, "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert all(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
