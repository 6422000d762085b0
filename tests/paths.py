"""Where the tests find the repository they test."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
