"""Shared by the benchmark scripts: the machine description and BENCHMARKS.md section updates."""

import datetime
import os
import platform
import re
from pathlib import Path

import torch

REPORT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
INTRO = "# Benchmarks\n\nMeasured figures; each section is regenerated in place by the script it names.\n"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line():
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
            f"torch {torch.__version__}. Date: {now}.")


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
