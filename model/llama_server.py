"""llama.cpp's own `llama-server`, built from the llama.cpp vendored in the pinned llama-cpp-python source
distribution that `make setup` fetches (model/llamacpp.py), for the GGUF tests and the speed benchmark.

`python -m model.llama_server` builds it (`make llamacpp` does, about 10 minutes on 2 cores); `--native` builds
for this CPU (-march=native, as llama.cpp builds by default) into its own folder, for the benchmark. The
default build targets any x86-64 CPU with AVX2, as a build for the native CPU crashes on some CI machines.
"""

import argparse
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from model.llamacpp import LLAMA_CPP_PYTHON, converter_folder, sdist_name


def binary(native=False):
    """Where the build puts `llama-server` (it may not exist yet)."""
    return converter_folder() / ("server-native" if native else "server") / "llama-server"


def build(native=False):
    """Builds `binary(native)` from the sdist beside the converter; does nothing when it is already there."""
    target = binary(native)
    if target.is_file():
        return target
    sdist = converter_folder() / sdist_name()
    if not sdist.is_file():
        raise SystemExit(f"{sdist} is missing: run `make setup` first")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            archive.extractall(tmp, members=members, filter="data")
        source, build_folder = Path(tmp) / prefix, Path(tmp) / "build"
        options = [
            f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
            "-DLLAMA_CURL=OFF",  # no network: models are local files
            "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(["cmake", "-S", source, "-B", build_folder, *options], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", build_folder, "--target", "llama-server", "-j"], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(target.name + ".tmp")
        shutil.copy2(build_folder / "bin" / "llama-server", staged)
        staged.rename(target)
    return target


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running(gguf_file, log_file, threads=1, slots=1, native=False):
    """`llama-server` serving `gguf_file` on a free loopback port, as its README runs it (the chat template from
    the file: --jinja), with `threads` for generation and prompts (None: its default) and `slots` requests at
    once; yields its URL.
    Its log goes to `log_file`."""
    port = free_port()
    command = [str(binary(native)), "-m", str(gguf_file), "--jinja", "--no-webui", "--host", "127.0.0.1"]
    command += ["--port", str(port), "-np", str(slots)]
    if threads is not None:  # None: llama-server's own choice (every core)
        command += ["-t", str(threads), "-tb", str(threads)]
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start (see {log_file})")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native", action="store_true", help="build for this CPU (the speed benchmark's build)")
    print(build(parser.parse_args().native))
