"""python -m serve [--host 127.0.0.1] [--port 8080] [--models-dir serve/models] [--api-key KEY] ...

Binding to any address but loopback needs an API key (--api-key, or the GPT_SERVE_API_KEY
environment variable, which other users cannot read in the process list).
"""

import argparse
import ipaddress
import logging
import math
import os
import sys

import torch
import uvicorn

from model.errors import PipelineError
from serve.app import BODY_SECONDS, LOOPBACK_HOSTS, MAX_BODY_BYTES, MAX_GENERATION_SECONDS, MAX_QUEUE, create_app
from serve.engine import DEFAULT_PRECISION, DEFAULT_THREADS
from serve.kernel import PRECISIONS
from serve.protocol import HEADER_SECONDS, MAX_CONNECTIONS, WRITE_SECONDS, uvicorn_settings


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name may resolve to a public interface
        return False


def positive(kind):
    def parse(text):
        value = kind(text)
        if not 0 < value < math.inf:  # also refuses nan; inf would switch a limit off
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
        return value

    return parse


def tcp_port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535 (0: any free one), not {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=tcp_port, default=8080)
    parser.add_argument("--models-dir", default="serve/models", help="folder of exported model folders")
    parser.add_argument("--max-batch", type=positive(int), default=16, help="requests decoded together per model")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="int8: int8 linear weights, a quarter of the memory traffic, and a 16-bit KV cache "
        "(default); fp32: exactly the exported weights, nothing rounded. Either way a request's text does not depend "
        "on the requests batched with it",
    )
    parser.add_argument(
        "--threads",
        type=positive(int),
        default=DEFAULT_THREADS,
        help=f"the decode kernel's threads, and torch's for a prompt's attention (default: every core this "
        f"process may use, {DEFAULT_THREADS} here; a step's threads wait on each other, so where another process "
        "holds a core, fewer)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GPT_SERVE_API_KEY") or None,
        help="required as `Authorization: Bearer KEY` on /v1 (default: $GPT_SERVE_API_KEY); "
        "without a key /v1 is open, which only a loopback --host allows",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin whose web pages may call the API, e.g. https://example.org (repeatable; default: none)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive(int),
        default=MAX_BODY_BYTES,
        help="largest request body; larger ones get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=positive(int),
        default=None,
        help="longest prompt, in tokens (default: each model's context)",
    )
    parser.add_argument(
        "--max-generation-seconds",
        type=positive(float),
        default=MAX_GENERATION_SECONDS,
        help="a generation running longer ends with finish_reason 'length' (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=positive(int),
        default=MAX_QUEUE,
        help="generations waiting for a batch slot per model; beyond, requests get 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name the server answers to, besides the loopback names (repeatable). "
        "Default: loopback names only when bound to loopback (a web page cannot reach the "
        "server through DNS rebinding); any name when bound to another address",
    )
    parser.add_argument(
        "--body-seconds",
        type=positive(float),
        default=BODY_SECONDS,
        help="a request body not received within this time gets 408 (default: %(default)s)",
    )
    parser.add_argument(
        "--header-seconds",
        type=positive(float),
        default=HEADER_SECONDS,
        help="a connection that has not sent a request's headers within this time is closed (default: %(default)s)",
    )
    parser.add_argument(
        "--write-seconds",
        type=positive(float),
        default=WRITE_SECONDS,
        help="a connection whose client reads nothing of its reply for this long, once the socket's "
        "buffers are full, is closed and its generations stop (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive(int),
        default=MAX_CONNECTIONS,
        help="open connections at once; a request on one more gets 503 (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        parser.error(
            f"--host {args.host} is reachable from other machines: give an API key with --api-key or "
            f"GPT_SERVE_API_KEY (or bind to 127.0.0.1)"
        )
    return args


def allowed_hosts(args):
    if args.allowed_host:
        return [*LOOPBACK_HOSTS, *args.allowed_host]
    return list(LOOPBACK_HOSTS) if is_loopback(args.host) else None


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The kernel takes its threads as a parameter; torch's own operations (a prompt's attention) take the same.
    torch.set_num_threads(args.threads)
    try:
        app = create_app(
            args.models_dir,
            max_batch=args.max_batch,
            max_body_bytes=args.max_body_bytes,
            precision=args.precision,
            api_key=args.api_key,
            cors_origins=args.cors_origin,
            max_prompt_tokens=args.max_prompt_tokens,
            max_generation_seconds=args.max_generation_seconds,
            max_queue=args.max_queue,
            allowed_hosts=allowed_hosts(args),
            body_seconds=args.body_seconds,
            threads=args.threads,
        )
    except PipelineError as error:  # one the operator can act on (the kernel is not built): its message, no trace
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        **uvicorn_settings(args.header_seconds, args.write_seconds, args.max_connections),
    )


if __name__ == "__main__":
    main()
