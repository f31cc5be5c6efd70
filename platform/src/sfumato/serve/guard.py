"""The HTTP guard both of sfumato's web apps share (the Serve ingress and the A/B page): a bearer
token checked before anything else, and a 422 that names each bad field without echoing it.

- `require_token`: every path but the open ones (/healthz for probes) needs the token: none is a
  401 (with `WWW-Authenticate: Bearer`), a wrong one a 403. It is a middleware, so it runs before
  request validation: without the token a client learns nothing of the schema. The comparison is
  constant-time (hmac.compare_digest), so the answer's timing does not leak how much of a guess
  was right. A browser page may also take the token from a cookie (the A/B page's /login sets it).
- `answer_invalid_requests`: FastAPI's 422 echoes each bad value back (`input`). That value may be
  a NaN, an Infinity or a 1e400 (not JSON), a lone surrogate (not encodable) or a megabyte of
  prompt; so the answer lists each error's location, message and type, and never the value.

Imported only by the apps, inside their builders: it needs FastAPI, which the default install
(the data platform) does not have.
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

HEALTH = "/healthz"


def token_matches(given: str, token: str) -> bool:
    """Constant-time in the token's content; any text compares (a lone surrogate included)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


def require_token(
    app: FastAPI,
    token: str,
    open_paths: tuple[str, ...] = (HEALTH,),
    cookie: str | None = None,
    how: str = "send an 'Authorization: Bearer TOKEN' header",
) -> None:
    """Adds the token middleware to `app`; an empty `token` adds none (no auth). `cookie`: the name
    of a cookie that may carry the token when no bearer header does. `how` ends the 401's detail:
    how a client gives the token."""
    if not token:
        return

    @app.middleware("http")
    async def authorised(request: Request, call_next):
        if request.url.path in open_paths:
            return await call_next(request)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = request.cookies.get(cookie, "") if cookie else ""
        if not given:
            return JSONResponse({"detail": f"a token is required: {how}"}, 401, headers={"WWW-Authenticate": "Bearer"})
        if not token_matches(given, token):
            return JSONResponse({"detail": "the token is not valid"}, 403)
        return await call_next(request)


def validation_detail(exc: RequestValidationError) -> list[dict]:
    """Each error's location, message and type; its `input` (the value) left out."""
    return [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in exc.errors()
    ]


def answer_invalid_requests(app: FastAPI) -> None:
    """Replaces `app`'s 422 handler with one that does not echo values (ASCII JSON, always encodable)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return Response(
            json.dumps({"detail": validation_detail(exc)}, ensure_ascii=True), 422, media_type="application/json"
        )
