"""The HTTP edge of the OpenAI endpoint: optional bearer-token check and OpenAI-shaped errors."""

from __future__ import annotations

import hmac

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse


class BearerTokenMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self._token = token.encode()

    async def dispatch(self, request, call_next):
        header = request.headers.get("authorization", "")
        given = header[7:].encode() if header.lower().startswith("bearer ") else b""
        if not hmac.compare_digest(given, self._token):
            return JSONResponse(status_code=401, content={"error": {
                "message": "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        return await call_next(request)


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
