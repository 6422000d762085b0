"""Errors, all in OpenAI's shape: APIError, the error body, what each status means in the OpenAPI schema,
and the exception handlers that turn every failure into such a body.

Every refusal is a 4xx naming the offending field where there is one, and no error ever carries a
trace: an unexpected one is logged and answered as a bare 500.
"""

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.schema import REQUEST_FIELD_NAMES, ErrorReply, UnsupportedField

log = logging.getLogger("serve")
ERROR_MEANINGS = {
    400: "a field is invalid; `param` names it",
    401: "the API key is missing or wrong (only when the server has one)",
    404: "no such model",
    408: "the request body did not arrive in time",
    413: "the body is over the size limit",
    429: "the model's queue is full; retry later",
    503: "the model is down: its decoding thread stopped on an error (see the server log)",
    "4XX": "any other refusal",
}
GENERATION_FAILED = "generating this reply failed on the server (the error is in its log); retry the request"


class APIError(Exception):
    """A refusal or failure to answer with: its HTTP status and the fields of OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return ErrorReply(error={"message": message, "type": kind, "param": param, "code": code}).model_dump()


def error_responses(*statuses):
    """OpenAPI `responses` for these error statuses; "4XX" also keeps FastAPI from declaring a 422 we never send."""
    return {status: {"model": ErrorReply, "description": ERROR_MEANINGS[status]} for status in (*statuses, "4XX")}


async def api_error(request, error):
    return JSONResponse(error_body(error.message, error.param, error.code, error.kind), status_code=error.status)


async def validation_error(request, error):
    # A union field (prompt: string or list) fails once per member; "not a string" about a list is the
    # least telling, so an error of another kind goes first.
    first = min(error.errors(), key=lambda detail: detail["type"].endswith("_type"))
    if first["type"] == "json_invalid":
        return JSONResponse(error_body("the request body is not valid JSON (UTF-8)"), status_code=400)
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, UnsupportedField):
        return JSONResponse(error_body(str(cause), cause.field, "unsupported_field"), status_code=400)
    # Keep field names and list indexes; pydantic also puts union member types ("str") in the path.
    location = [str(part) for part in first["loc"] if isinstance(part, int) or part in REQUEST_FIELD_NAMES]
    field = ".".join(location) or None
    return JSONResponse(error_body(f"{field or 'body'}: {first['msg']}", field), status_code=400)


async def http_error(request, error):
    return JSONResponse(error_body(str(error.detail)), status_code=error.status_code, headers=error.headers)


async def unexpected_error(request, error):
    log.exception("unexpected error")
    return JSONResponse(error_body("internal error", kind="server_error"), status_code=500)


def add_error_handlers(app):
    """Answers every exception a route or a guard raises with an error body."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
