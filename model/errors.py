"""Failures we expect, and how a stage reports them: one sentence and a non-zero exit, no traceback.

Every error a user can act on (a bad param, a source that cannot be read, a corpus too small, a full
disk, a run that cannot resume or diverged) derives from PipelineError. Anything else is a bug and
keeps its traceback.
"""

import inspect
import sys


class PipelineError(Exception):
    """An expected failure; its message says what was wrong and what to change."""


def run_stage(main):
    """Calls main(*command-line arguments); a PipelineError ends the process with its message, and a wrong
    number of arguments with the stage's usage line (from its module's docstring) and exit status 2."""
    try:
        inspect.signature(main).bind(*sys.argv[1:])
    except TypeError:
        doc = sys.modules[main.__module__].__doc__ or ""
        usage = next((line for line in doc.splitlines() if line.startswith("usage:")), f"usage: {main.__module__}")
        print(
            f"{usage}\nerror: expected {len(inspect.signature(main).parameters)} arguments, got {len(sys.argv) - 1}",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        main(*sys.argv[1:])
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
