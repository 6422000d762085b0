"""Shared by the benchmark scripts: the machine description, BENCHMARKS.md sections, a server to load."""

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from model.llama_server import free_port

REPORT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
INTRO = "# Benchmarks\n\nMeasured figures; each section is regenerated in place by the script it names.\n"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line():
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}. Date: {now}."
    )


def percentile(values, share):
    """The value at `share` (0.5 for the median, 0.99 for p99) of `values`, by nearest rank; nan if empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def write_section(heading, body):
    """Replaces the section `heading` of BENCHMARKS.md (up to the next '## ') or appends it."""
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else INTRO
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    REPORT.write_text(text, encoding="utf-8")


@contextmanager
def running_server(models_dir, *options, stderr=subprocess.DEVNULL):
    """`python -m serve` on a free loopback port with `options`; yields (url, process) once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "--port", str(port), "--models-dir", str(models_dir), *options],
        cwd=REPORT.parent,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)
