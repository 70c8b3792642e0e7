"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and how exceptions map to them.

Anything a client can cause (a ValueError from hark, a pydantic validation error) is a 4xx that says
what to fix; anything else is a 500 whose body says only that the server failed (the log has the rest).
"""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hark.engine.async_engine import EngineDeadError
from hark.media import MediaFetchError, MediaTooLargeError

logger = logging.getLogger("hark.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def to_api_error(e: BaseException) -> APIError:
    """The client-facing form of any exception a request raised."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaTooLargeError):
        return APIError(413, str(e), code="media_too_large")
    if isinstance(e, MediaFetchError) and e.status_code is not None and 400 <= e.status_code < 500:
        return APIError(422, str(e), code="media_fetch_failed")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    logger.error("request failed", exc_info=e)
    return APIError(500, "the server failed to handle the request; see the server log", code="internal_error")


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    async def _known(request: Request, e: Exception):
        err = to_api_error(e)
        return error_response(err.status, err.message, err.param, err.code)

    # APIError and ValueError are answered by Starlette's ExceptionMiddleware; the Exception handler
    # runs in ServerErrorMiddleware (which logs the traceback server-side after answering).
    for exc_class in (APIError, ValueError, EngineDeadError, Exception):
        app.add_exception_handler(exc_class, _known)
