"""Runs the real server (uvicorn, real sockets) in a background thread for the tests, and what its tests wait with."""

import threading
import time

import uvicorn

from serve.app import create_app
from serve.protocol import uvicorn_settings


class RunningServer:
    """The app as `python -m serve` runs it: uvicorn with the same protocol and limits (`limits` are
    uvicorn_settings' header_seconds, write_seconds and max_connections: the command's --header-seconds,
    --write-seconds and --max-connections), its models' kernels on the command's default threads; the models'
    engines close with the server (the app's lifespan)."""

    def __init__(self, models_dir, limits=None, **options):
        self.app = create_app(models_dir, **options)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_settings(**(limits or {}))
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(condition, seconds=10.0):
    """The first truthy value of `condition()` within `seconds`."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
    return value


def slowed(decode, seconds):
    """`decode` (an engine's decoder) taking at least `seconds` a step: generations that must outlast something
    else then do, however fast the machine decodes. The logits are the decoder's own."""

    def slow_decode(*step):
        time.sleep(seconds)
        return decode(*step)

    return slow_decode
