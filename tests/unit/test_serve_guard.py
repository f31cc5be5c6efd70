"""The guard both web apps share (sfumato.serve.guard), on a tiny FastAPI app: the token is asked
for before validation and compared, /healthz stays open, and a 422 names the field without
echoing its value (a NaN or a huge number cannot come back as JSON, a long prompt should not)."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from sfumato.serve.guard import answer_invalid_requests, require_token, token_matches  # noqa: E402

TOKEN = "s3cret-token"
SECRET_VALUE = "do-not-echo-me-" * 8


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(1, ge=1, le=10)
    scale: float = 1.0
    prompt: str = Field("", max_length=16)


def _client(token: str = TOKEN, cookie: str | None = None) -> TestClient:
    app = FastAPI()
    answer_invalid_requests(app)
    require_token(app, token, cookie=cookie)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/echo")
    def echo(body: Body) -> dict:
        return body.model_dump()

    return TestClient(app)


def _post(client, body, token: str | None = TOKEN, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post("/echo", content=data, headers={**headers, "content-type": "application/json"}, **kwargs)


def test_no_token_is_401_a_wrong_one_403_the_right_one_200():
    client = _client()
    missing = _post(client, {"steps": 2}, token=None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert _post(client, {"steps": 2}, token="wrong").status_code == 403
    assert _post(client, {"steps": 2}, token="").status_code == 401, "'Bearer ' with nothing after it"
    basic = client.post("/echo", json={"steps": 2}, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401, "only a bearer header carries the token"
    right = _post(client, {"steps": 2})
    assert right.status_code == 200 and right.json()["steps"] == 2


def test_the_token_is_checked_before_validation_and_healthz_is_open():
    client = _client()
    assert _post(client, {"steps": 99999}, token=None).status_code == 401, "no schema detail without the token"
    assert _post(client, {"steps": 99999}, token="wrong").status_code == 403
    assert client.get("/healthz").status_code == 200


def test_a_cookie_carries_the_token_only_where_the_app_takes_one():
    with_cookie = _client(cookie="session_token")
    with_cookie.cookies.set("session_token", TOKEN)
    assert _post(with_cookie, {"steps": 2}, token=None).status_code == 200
    with_cookie.cookies.set("session_token", "wrong")
    assert _post(with_cookie, {"steps": 2}, token=None).status_code == 403
    without = _client()
    without.cookies.set("session_token", TOKEN)
    assert _post(without, {"steps": 2}, token=None).status_code == 401


def test_an_empty_token_means_no_auth():
    assert _post(_client(token=""), {"steps": 2}, token=None).status_code == 200


@pytest.mark.parametrize(
    "body, field",
    [
        ({"steps": 123456789}, "steps"),
        ({"prompt": SECRET_VALUE}, "prompt"),
        ('{"scale": NaN}', "scale"),
        ('{"scale": Infinity}', "scale"),
        ('{"scale": 1e400}', "scale"),
    ],
)
def test_a_422_names_the_field_and_does_not_echo_the_value(body, field):
    answer = _post(_client(), body)
    assert answer.status_code == 422, answer.text
    (error,) = json.loads(answer.content)["detail"]  # strict JSON: no NaN or Infinity in it
    assert error["loc"] == ["body", field] and error["msg"] and error["type"], error
    assert "input" not in error and "ctx" not in error
    for echoed in ("123456789", "do-not-echo-me", "NaN", "Infinity", "1e400"):
        assert echoed not in answer.text, answer.text


def test_a_broken_body_is_a_4xx_with_a_detail():
    answer = _post(_client(), '{"steps": ')
    assert answer.status_code in (400, 422) and answer.json()["detail"], answer.text


def test_token_comparison_takes_any_text():
    assert token_matches(TOKEN, TOKEN) and not token_matches(TOKEN[:-1], TOKEN)
    assert not token_matches("\ud800", TOKEN), "a lone surrogate is compared, not an exception"
    assert token_matches("é-token", "é-token")
