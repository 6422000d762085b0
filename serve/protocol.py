"""uvicorn's HTTP/1.1 protocol with deadlines for request heads and for clients that stop reading, and
errors in OpenAI's JSON shape.

uvicorn times out only idle keep-alive connections: a client that connects and sends nothing, or a
few bytes of headers now and then, holds its socket forever, and enough of them exhaust the
server. Here a connection must send a whole request head within `header_seconds` of connecting
(or of its previous response); a malformed one gets the same JSON error body as every other
refusal. A client that stops reading a reply holds its socket, and the generation behind it, just
as long: once the socket's buffers are full, a connection whose client takes nothing for
`write_seconds` is closed (its generations then stop, as for any client that leaves).
"""

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0
WRITE_SECONDS = 30.0
MAX_CONNECTIONS = 512
log = logging.getLogger("serve")


def uvicorn_settings(header_seconds=HEADER_SECONDS, write_seconds=WRITE_SECONDS, max_connections=MAX_CONNECTIONS):
    """uvicorn.run's (and uvicorn.Config's) protocol and limits for the command's settings."""
    # uvicorn refuses a request once as many connections as its limit are open, counting the request's own:
    # one more serves exactly `max_connections`.
    return {
        "http": deadline_protocol(header_seconds, write_seconds),
        "timeout_keep_alive": header_seconds,
        "limit_concurrency": max_connections + 1,
    }


def deadline_protocol(header_seconds, write_seconds):
    """An H11Protocol class for uvicorn's `http` setting that enforces `header_seconds` and `write_seconds`."""

    class DeadlineProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(header_seconds, self._close_if_no_request)
            self._write_deadline = None

        def on_response_complete(self):
            super().on_response_complete()
            self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_seconds, self._close_if_no_request)

        def connection_lost(self, exc):
            self._header_deadline.cancel()
            if self._write_deadline:
                self._write_deadline.cancel()
            super().connection_lost(exc)

        def _close_if_no_request(self):
            # IDLE: no complete request head yet (h11 holds partial headers back); a request being answered
            # has its own limits.
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

        # asyncio pauses writing when the socket's buffers and the transport's own are full, and resumes once
        # the client has read enough.
        def pause_writing(self):
            super().pause_writing()
            self._write_deadline = self.loop.call_later(write_seconds, self._abort_stalled_write)

        def resume_writing(self):
            super().resume_writing()
            if self._write_deadline:
                self._write_deadline.cancel()
                self._write_deadline = None

        def _abort_stalled_write(self):
            log.warning(
                "closing a connection from %s:%s: its client read nothing for %g s", *self.client[:2], write_seconds
            )
            self.transport.abort()  # close() would wait to send what is buffered, to a client that takes nothing

        def send_400_response(self, msg):
            body = json.dumps(
                {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": "invalid_http"}}
            ).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return DeadlineProtocol
