"""Failures we expect, and how a stage reports them: one sentence and a non-zero exit, no traceback.

Every error a user can act on (a bad param, a source that cannot be read, a corpus too small, a full
disk, a run that cannot resume or diverged) derives from PipelineError. Anything else is a bug and
keeps its traceback.
"""

import sys


class PipelineError(Exception):
    """An expected failure; its message says what was wrong and what to change."""


def run_stage(main):
    """Calls main(*command-line arguments); a PipelineError ends the process with its message."""
    try:
        main(*sys.argv[1:])
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
