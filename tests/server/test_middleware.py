"""The pure ASGI middleware, driven directly with scopes and recorded messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from kubellm.server.middleware import (
    ApiKeyMiddleware,
    DrainingMiddleware,
    LimitsMiddleware,
    RequestIdMiddleware,
    import_attribute,
)


class EchoApp:
    """Reads the whole body, then answers 200 with the number of bytes read."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"client went away"})
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


def http_scope(
    path: str = "/v1/models",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "GET",
    root_path: str = "",
) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "headers": headers or [],
        "query_string": b"",
    }


async def run(app: Any, scope: Scope, chunks: list[bytes] | None = None) -> list[Message]:
    pending = list(chunks or [b""])
    sent: list[Message] = []

    async def receive() -> Message:
        if not pending:
            return {"type": "http.disconnect"}
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def status_of(sent: list[Message]) -> int:
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return int(starts[0]["status"])


def error_of(sent: list[Message]) -> dict[str, Any]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return dict(json.loads(body)["error"])


def limits(app: Any) -> LimitsMiddleware:
    return LimitsMiddleware(app, max_header_bytes=2048, max_header_count=10, max_body_bytes=1000)


async def test_small_request_passes_limits() -> None:
    app = EchoApp()
    sent = await run(limits(app), http_scope(method="POST"), [b"x" * 600, b"y" * 400])
    assert status_of(sent) == 200
    assert sent[-1]["body"] == b"1000"


async def test_too_many_headers_is_431() -> None:
    app = EchoApp()
    headers = [(f"x-h{i}".encode(), b"v") for i in range(11)]
    sent = await run(limits(app), http_scope(headers=headers))
    assert status_of(sent) == 431
    assert error_of(sent)["code"] == 431
    assert app.calls == 0


async def test_large_header_block_is_431() -> None:
    app = EchoApp()
    sent = await run(limits(app), http_scope(headers=[(b"x-big", b"a" * 3000)]))
    assert status_of(sent) == 431
    assert app.calls == 0


async def test_content_length_over_limit_is_413_without_reading() -> None:
    app = EchoApp()
    read = []

    async def receive() -> Message:
        read.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope(method="POST", headers=[(b"content-length", b"5000")])
    await limits(app)(scope, receive, send)
    assert status_of(sent) == 413
    assert error_of(sent)["type"] == "RequestTooLargeError"
    assert (b"connection", b"close") in sent[0]["headers"]
    assert not read and app.calls == 0


async def test_invalid_content_length_is_400() -> None:
    scope = http_scope(method="POST", headers=[(b"content-length", b"12x")])
    sent = await run(limits(EchoApp()), scope)
    assert status_of(sent) == 400


async def test_chunked_body_is_cut_off_at_the_limit() -> None:
    app = EchoApp()
    sent = await run(limits(app), http_scope(method="POST"), [b"x" * 600] * 5)
    assert status_of(sent) == 413  # the app's own answer (400 on disconnect) was replaced
    assert app.calls == 1


async def test_request_id_is_echoed_or_created() -> None:
    app = RequestIdMiddleware(EchoApp())
    sent = await run(app, http_scope(headers=[(b"x-request-id", b"abc-1")]))
    assert (b"x-request-id", b"abc-1") in sent[0]["headers"]
    sent = await run(app, http_scope())
    ids = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32
    int(ids[0], 16)


def auth(app: Any) -> ApiKeyMiddleware:
    return ApiKeyMiddleware(app, api_keys=["sk-one", "sk-two"])


async def test_auth_requires_a_valid_bearer_key() -> None:
    app = EchoApp()
    sent = await run(auth(app), http_scope())
    assert status_of(sent) == 401
    assert error_of(sent) == {
        "message": "Invalid or missing API key.",
        "type": "AuthenticationError",
        "param": None,
        "code": 401,
    }
    wrong = await run(auth(app), http_scope(headers=[(b"authorization", b"Bearer sk-three")]))
    assert status_of(wrong) == 401
    basic = await run(auth(app), http_scope(headers=[(b"authorization", b"Basic sk-one")]))
    assert status_of(basic) == 401
    assert app.calls == 0
    for key in (b"sk-one", b"sk-two"):
        ok = await run(auth(app), http_scope(headers=[(b"authorization", b"Bearer " + key)]))
        assert status_of(ok) == 200
    assert app.calls == 2


async def test_auth_allowlist_and_options() -> None:
    app = EchoApp()
    for path in ("/health", "/ping", "/version", "/metrics", "/docs", "/openapi.json"):
        assert status_of(await run(auth(app), http_scope(path))) == 200, path
    assert (
        status_of(await run(auth(app), http_scope("/v1/chat/completions", method="OPTIONS"))) == 200
    )
    for path in ("/load", "/tokenize", "/health/", "/v1/models", "/anything"):
        assert status_of(await run(auth(app), http_scope(path))) == 401, path


async def test_auth_ignores_the_host_header() -> None:
    """CVE-2026-48746: `Host: x/health?` makes request.url.path lie; the scope path does not."""
    app = EchoApp()
    scope = http_scope("/v1/models", headers=[(b"host", b"x/health?")])
    assert status_of(await run(auth(app), scope)) == 401


async def test_auth_strips_root_path() -> None:
    app = EchoApp()
    assert status_of(await run(auth(app), http_scope("/api/health", root_path="/api"))) == 200
    assert status_of(await run(auth(app), http_scope("/api/v1/models", root_path="/api"))) == 401


class _State:
    draining = False


class _App:
    def __init__(self) -> None:
        self.state = type("S", (), {})()


async def test_draining_refuses_non_probe_routes() -> None:
    inner = EchoApp()
    app = DrainingMiddleware(inner)
    starlette_app = _App()
    starlette_app.state.kubellm = _State()
    scope = {**http_scope("/v1/completions"), "app": starlette_app}
    assert status_of(await run(app, scope)) == 200
    starlette_app.state.kubellm.draining = True
    sent = await run(app, scope)
    assert status_of(sent) == 503
    assert error_of(sent)["type"] == "ServiceUnavailableError"
    assert status_of(await run(app, {**scope, "path": "/health"})) == 200


def test_import_attribute_errors_are_clear() -> None:
    assert import_attribute("json:dumps") is json.dumps
    for bad, fragment in (
        ("nomodule_xyz:thing", "cannot import"),
        ("json:nothing_here", "has no"),
        ("nothing", "expected an import path"),
    ):
        with pytest.raises(ValueError, match=fragment):
            import_attribute(bad)


# ------------------------------------------------------------------ the composed app (fakes)


class EchoBody(BaseModel):
    n: int


class FakeEngine:
    """What the probes and `ServerState.facts` read of an `EngineClient`."""

    def __init__(self, required: int = 1) -> None:
        self.dead: Exception | None = None
        self.num_in_flight = 0
        self.num_ready = 1
        self.required = required

    @property
    def errored(self) -> bool:
        return self.dead is not None

    @property
    def ready(self) -> bool:
        return not self.errored and self.num_ready >= self.required

    @property
    def facts(self) -> Any:
        from kubellm.server.errors import EngineUnavailableError

        if self.num_ready == 0:
            raise EngineUnavailableError("no engine is ready")
        return "facts of the first ready engine"

    async def check_health(self) -> None:
        if self.dead is not None:
            raise self.dead


def fake_app(parallel: dict[str, Any] | None = None, **frontend: Any) -> tuple[Any, Any]:
    from fastapi import FastAPI

    from kubellm.protocol.settings import FrontendSettings, ParallelSettings, ServeSettings
    from kubellm.server.app import build_app
    from kubellm.server.errors import (
        EngineDeadError,
        EngineGenerateError,
        EngineUnavailableError,
        OpenAIError,
    )
    from kubellm.server.state import ServerState

    settings = ServeSettings(
        frontend=FrontendSettings(**frontend), parallel=ParallelSettings(**(parallel or {}))
    )
    state = ServerState(
        settings=settings,
        engine=FakeEngine(settings.parallel.required_engines),  # type: ignore[arg-type]
        tokenizer=None,  # type: ignore[arg-type]
        served_model_names=("m",),
        supported_tasks=(),
        stats=None,  # type: ignore[arg-type]
    )
    app: FastAPI = build_app(state, ())

    @app.post("/v1/echo")
    async def echo(body: EchoBody) -> dict[str, int]:
        return {"n": body.n}

    @app.get("/v1/raise/{kind}")
    async def boom(kind: str) -> None:
        errors: dict[str, Exception] = {
            "openai": OpenAIError("bad n", status=422, type="UnprocessableEntityError", param="n"),
            "generate": EngineGenerateError("step failed"),
            "dead": EngineDeadError("gone"),
            "unavailable": EngineUnavailableError("no engine has registered yet"),
            "other": RuntimeError("/secret/path/file.py exploded"),
        }
        raise errors[kind]

    @app.get("/v1/facts")
    async def facts() -> str:
        return str(state.facts)

    return app, state


def client_for(app: Any) -> Any:
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_health_follows_engine_and_draining() -> None:
    from kubellm.server.errors import EngineDeadError

    app, state = fake_app()
    async with client_for(app) as client:
        ok = await client.get("/health")
        assert ok.status_code == 200 and ok.content == b""
        assert (await client.post("/ping")).status_code == 200
        assert (await client.get("/load")).json() == {"server_load": 0}
        assert "version" in (await client.get("/version")).json()
        state.engine.dead = EngineDeadError("gone")
        dead = await client.get("/health")
        assert dead.status_code == 503 and dead.json()["error"]["code"] == 503
        assert (await client.get("/ping")).status_code == 503
        state.engine.dead = None
        state.draining = True
        assert (await client.get("/health")).status_code == 503
        refused = await client.post("/v1/echo", json={"n": 1})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"


async def test_ready_counts_engines_and_health_ignores_remote_ones() -> None:
    from kubellm.server.errors import EngineDeadError

    app, state = fake_app(
        parallel={"data_parallel_size": 4, "data_parallel_size_local": 0, "min_ready_engines": 2}
    )
    state.engine.num_ready = 1
    async with client_for(app) as client:
        not_ready = await client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["error"]["type"] == "ServiceUnavailableError"
        assert not_ready.json()["error"]["message"] == "1 of 4 engines ready (need 2)"
        assert (await client.get("/health")).status_code == 200  # liveness: not the engines'
        state.engine.num_ready = 3
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "engines": {"ready": 3, "required": 2, "expected": 4},
        }
        state.draining = True
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 503
        state.draining = False
        state.engine.dead = EngineDeadError("a local engine died")
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 503


async def test_facts_are_503_until_an_engine_is_ready() -> None:
    from kubellm.server.errors import EngineUnavailableError

    app, state = fake_app(api_key=("k",))
    state.engine.num_ready = 0
    async with client_for(app) as client:
        response = await client.get("/v1/facts", headers={"Authorization": "Bearer k"})
        assert response.status_code == 503
        assert response.json()["error"]["message"] == EngineUnavailableError.CLIENT_MESSAGE
        assert (await client.get("/ready")).status_code == 503  # no key needed for probes
        state.engine.num_ready = 1
        response = await client.get("/v1/facts", headers={"Authorization": "Bearer k"})
        assert response.json() == "facts of the first ready engine"
        assert (await client.get("/ready")).status_code == 200


async def test_exceptions_map_to_openai_errors() -> None:
    from kubellm.server.errors import EngineDeadError, EngineUnavailableError

    app, _state = fake_app()
    async with client_for(app) as client:
        expected = {
            "openai": (422, "UnprocessableEntityError", "bad n"),
            "generate": (500, "InternalServerError", "The engine failed to process this request."),
            "dead": (500, "InternalServerError", EngineDeadError.CLIENT_MESSAGE),
            "unavailable": (
                503,
                "ServiceUnavailableError",
                EngineUnavailableError.CLIENT_MESSAGE,
            ),
            "other": (
                500,
                "InternalServerError",
                "The server had an internal error while processing your request.",
            ),
        }
        for kind, (status, type_, message) in expected.items():
            response = await client.get(f"/v1/raise/{kind}")
            assert response.status_code == status, kind
            error = response.json()["error"]
            assert (error["code"], error["type"], error["message"]) == (status, type_, message)
        assert "/secret" not in (await client.get("/v1/raise/other")).text


async def test_validation_and_routing_errors_have_the_openai_shape() -> None:
    app, _state = fake_app()
    async with client_for(app) as client:
        invalid = await client.post("/v1/echo", json={"n": "x" * 5000})
        assert invalid.status_code == 400
        error = invalid.json()["error"]
        assert error["code"] == 400 and error["param"] == "n"
        assert "xxxx" not in error["message"]
        malformed = await client.post(
            "/v1/echo", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 400
        assert malformed.json()["error"]["type"] == "BadRequestError"
        missing = await client.get("/nope")
        assert missing.status_code == 404
        assert missing.json()["error"] == {
            "message": "Not Found",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        wrong_method = await client.get("/v1/echo")
        assert wrong_method.status_code == 405
        assert wrong_method.json()["error"]["code"] == 405


async def test_docs_can_be_disabled_and_auth_guards_the_app() -> None:
    app, _state = fake_app(disable_fastapi_docs=True, api_key=("k",))
    async with client_for(app) as client:
        assert (await client.get("/openapi.json")).status_code == 404
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/v1/echo", json={"n": 1})).status_code == 401
        authed = await client.post("/v1/echo", json={"n": 1}, headers={"Authorization": "Bearer k"})
        assert authed.json() == {"n": 1}


async def add_function_header(request: Any, call_next: Any) -> Any:
    """A user middleware function (loaded by import path below)."""
    response = await call_next(request)
    response.headers["x-function"] = "1"
    return response


class AddClassHeader:
    """A user middleware class (loaded by import path below)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-class", b"1")]}
            await send(message)

        await self.app(scope, receive, send_with_header)


NOT_MIDDLEWARE = 42


async def test_user_middleware_by_import_path() -> None:
    module = __name__
    app, _state = fake_app(middleware=(f"{module}:add_function_header", f"{module}:AddClassHeader"))
    async with client_for(app) as client:
        response = await client.get("/health")
    assert response.headers["x-function"] == "1"
    assert response.headers["x-class"] == "1"
    with pytest.raises(ValueError, match="expected an ASGI middleware class or an async"):
        fake_app(middleware=(f"{module}:NOT_MIDDLEWARE",))
