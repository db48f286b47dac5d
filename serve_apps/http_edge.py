"""The HTTP edge of the OpenAI endpoint: optional bearer-token check and OpenAI-shaped errors."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

UNAUTHORIZED = {"error": {"message": "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


class BearerTokenMiddleware:
    """Refuse HTTP requests without ``Authorization: Bearer <token>`` (401, OpenAI's shape).

    A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: that one wraps every response
    in a second stream, which costs CPU on each streamed token.
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self._token):
                await JSONResponse(status_code=401, content=UNAUTHORIZED)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def openai_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None,
                                                               "code": code or status}})


def add_openai_error_handlers(app) -> None:
    """Answer FastAPI's own errors (unknown route or model, body validation) in OpenAI's shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        return openai_error(exc.status_code, str(exc.detail))

    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return openai_error(400, f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
