"""What stands between the internet and the routes: the request guard (Host names, body framing, size and
read time), CORS, and the API key.

A loopback server answers only to loopback host names (no DNS rebinding), CORS stays closed unless
origins are named, and with an API key /v1 and the API docs need it. Refusals come in OpenAI's error
shape, as every other error.
"""

import asyncio
import hmac
import json

from fastapi import Depends, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from serve.errors import APIError, error_body

CLOSE = (b"connection", b"close")


async def _send_error(send, status, message, code=None):
    body = json.dumps(error_body(message, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), CLOSE],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuses, in OpenAI's error shape and before any route runs: a Host that is not allowed (a web page
    reaching a loopback server through DNS rebinding), a body framed two ways at once, a declared body over the
    limit (413 before the client is told to continue), a body that grows over the limit, and a body that takes
    longer than `body_seconds` in all, from the first time the app asks for it (a deadline per read would let a
    client trickle a byte at a time forever). A response that starts before its body is all in closes the
    connection, so that nothing the client still sends is read as another request, or keeps the socket open."""

    def __init__(self, app, max_bytes, body_seconds, allowed_hosts):
        self.app, self.max_bytes, self.body_seconds = app, max_bytes, body_seconds
        self.allowed_hosts = None if allowed_hosts is None else {host.lower() for host in allowed_hosts}

    def _host_allowed(self, headers):
        if self.allowed_hosts is None:
            return True
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
        return name in self.allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self._host_allowed(headers):
            return await _send_error(
                send,
                400,
                "this server does not answer to that Host header; start it with --allowed-host NAME to add one",
                "invalid_host",
            )
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # RFC 9112 6.3: such a message may be refused, and must be, where a proxy in front could read its
            # length the other way (request smuggling).
            return await _send_error(
                send, 400, "the request has both Transfer-Encoding and Content-Length; send one of them", "invalid_http"
            )
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, f"the request body is over the limit of {self.max_bytes} bytes")
        # A request without a body (no length, or 0, and no chunks) is complete before it is read.
        received, deadline = 0, None
        complete = b"transfer-encoding" not in headers and declared.isdigit() and int(declared) == 0

        async def guarded_receive():
            nonlocal received, complete, deadline
            if complete:  # the body is in: what comes now is a disconnect, which may take any time
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_seconds
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_seconds:g} s") from None
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False) or message["type"] == "http.disconnect"
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body is over the limit of {self.max_bytes} bytes")
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not complete:
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, guarded_receive, closing_send)


class JSONCORSMiddleware(CORSMiddleware):
    """CORSMiddleware whose refusals of a preflight come in OpenAI's error shape, as every other error."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = response.body.decode()
        return JSONResponse(error_body(f"CORS: {reason}", code="cors_refused"), status_code=400)


def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))
):
    """The routes' dependency that refuses a request without the server's API key (when it has one)."""
    api_key = request.app.state.settings.api_key
    # compare_digest takes the same time wherever the first wrong byte is, so timing reveals nothing of the key.
    if api_key and (credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode())):
        raise APIError(
            401, "this server needs an API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
        )
