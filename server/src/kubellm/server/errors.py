"""The server's exceptions. HTTP mapping happens in one place: `kubellm.server.handlers`."""

from __future__ import annotations


class ServerError(Exception):
    """Base of kubellm.server errors."""


class OpenAIError(ServerError):
    """An error returned to the client as OpenAI-style JSON:
    {"error": {"message", "type", "param", "code"}} with HTTP status `status`."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "BadRequestError",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param


class EngineGenerateError(ServerError):
    """One request failed in the engine; the engine and the server stay healthy (HTTP 500)."""


class EngineDeadError(ServerError):
    """The engine core is gone (process exited, reported a fatal error, or stopped sending
    heartbeats). /health turns 503 and the watchdog ends the process non-zero."""

    CLIENT_MESSAGE = "The server had an error while processing your request: the engine died."


class EngineStartupError(ServerError):
    """The engine core failed to start (exited, or not ready before the timeout)."""


class EngineUnavailableError(ServerError):
    """No engine is ready to take the request (a head whose engines have not registered yet,
    or all of them died); HTTP 503. The server itself stays up."""

    CLIENT_MESSAGE = "No engine is ready to serve this request; try again later."
