"""uvicorn's HTTP/1.1 protocol with a deadline for request heads, and errors in OpenAI's JSON shape.

uvicorn times out only idle keep-alive connections: a client that connects and sends nothing, or a
few bytes of headers now and then, holds its socket forever, and enough of them exhaust the
server. Here a connection must send a whole request head within `header_seconds` of connecting
(or of its previous response); a malformed one gets the same JSON error body as every other
refusal.
"""

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0
MAX_CONNECTIONS = 512


def header_timeout_protocol(header_seconds):
    """An H11Protocol class for uvicorn's `http` setting that enforces `header_seconds`."""

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(header_seconds, self._close_if_no_request)

        def on_response_complete(self):
            super().on_response_complete()
            self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_seconds, self._close_if_no_request)

        def connection_lost(self, exc):
            self._header_deadline.cancel()
            super().connection_lost(exc)

        def _close_if_no_request(self):
            # IDLE: no complete request head yet (h11 holds partial headers back); a request being answered
            # has its own limits.
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

        def send_400_response(self, msg):
            body = json.dumps({"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                         "code": "invalid_http"}}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return HeaderTimeoutProtocol
