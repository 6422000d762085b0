"""`dvc repro` killed with SIGKILL in the middle of each long stage, then rerun: the pipeline finishes with the
results of an uninterrupted run.

The reference is `short_pipeline` (conftest.py): a scratch copy with short training after one uninterrupted
`dvc repro`. The kills run in a git clone of that copy (same sources and params, no outputs), as a chain:
`dvc repro` starts in a process group of its own and, once the next stage on KILLED is under way, the whole
group (DVC and the stage's process) gets SIGKILL: a training stage between two checkpoints, another stage as
soon as its temporary output appears (see DELAY_S). The next `dvc repro` must run the killed stage again (a
training stage resuming from its checkpoint) and is killed in turn in the next stage; the last one runs to
the end. Right after each kill, no output of the killed stage may look finished unless it is byte-identical
to the reference's, and `dvc status` must report the stage as changed. At the end dvc.lock must equal the
reference's, but for the wall-clock throughput that the training metrics, plots and checkpoints record.

Takes 2 to 5 minutes on 2 CPU cores (two whole runs of the pipeline with short training, plus restarts).
"""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from model.training import WALL_CLOCK_FIGURES
from tests.pipeline_copy import clone_workspace, stages_that_ran

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups"),
]

# In the order `dvc repro` runs them (combine takes a fraction of a second and is left out).
KILLED = (
    "extract_wikipedia",
    "extract_c4",
    "extract_dialog",
    "build_bpe",
    "encode",
    "pretrain",
    "finetune",
    "evaluate",
    "export",
    "gguf",
    "task_scores",
)
TRAINING = ("pretrain", "finetune")
# A stage other than training is killed as soon as a temporary output of it appears, or at the latest this
# long after DVC announces it. Where the stage writes all along (streaming extraction, the token arrays, the
# export folders) the temporary comes first; build_bpe and evaluate write in one go at their very end, so
# they are killed early, while they compute.
DELAY_S = {
    "extract_wikipedia": 3.0,
    "extract_c4": 3.0,
    "extract_dialog": 3.0,
    "build_bpe": 0.05,
    "encode": 3.0,
    "evaluate": 0.5,
    "export": 3.0,
    "gguf": 3.0,
    "task_scores": 3.0,
}
REPRO_TIMEOUT_S = 300

# The checkpoints hold wall-clock throughput (tokens/s, MFU on GPUs) in the logged history of their metadata:
# equal after removing those values. No DVC output holds it.
CHECKPOINTS = ("checkpoints/pretrain.safetensors", "checkpoints/finetune.safetensors")
# The training stages' live metrics and plots: dvclive writes them as training goes, so a killed run leaves
# them part-way; the resumed run rewrites them whole from the checkpoint's history (the final test checks).
LIVE_OUTPUTS = tuple(f"metrics/{stage}/{path}" for stage in TRAINING for path in ("metrics.json", "plots/metrics"))


class Repro:
    """`dvc repro` in a process group of its own; its stdout and stderr are collected as they come."""

    def __init__(self, workspace):
        self.process = subprocess.Popen(
            workspace.dvc_command("repro"),
            cwd=workspace.root,
            env=workspace.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._chunks = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := self.process.stdout.read1(65536):
            self._chunks.append(chunk)

    @property
    def output(self):
        return b"".join(self._chunks).decode("utf-8", errors="replace")

    def wait_until(self, condition, what, interval=0.02):
        deadline = time.monotonic() + REPRO_TIMEOUT_S
        while not condition():
            if self.process.poll() is not None:
                self._reader.join(timeout=10)
                raise AssertionError(
                    f"dvc repro ended ({self.process.returncode}) before {what}:\n{self.output[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {REPRO_TIMEOUT_S} s:\n{self.output[-4000:]}")
            time.sleep(interval)

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._reader.join(timeout=10)
        return self.process.returncode

    def finish(self):
        try:
            returncode = self.process.wait(timeout=REPRO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        assert returncode == 0, f"dvc repro failed ({returncode}):\n{self.output[-6000:]}"
        return self.output


def _temporaries(workspace, outputs):
    """Temporary files or folders of model.files.atomic_output beside `outputs`."""
    found = []
    for out in outputs:
        parent, name = (workspace.root / out).parent, (workspace.root / out).name
        if parent.is_dir():
            found += [entry.name for entry in os.scandir(parent) if entry.name.startswith(f".{name}.tmp-")]
    return found


def _steps_done(output, stage):
    """The last step the stage logged in `output` (a line every log_every steps: DVC's output is no terminal), 0
    before the first."""
    counts = re.findall(rf"^{stage}: step (\d+)/\d+", output, re.MULTILINE)
    return int(counts[-1]) if counts else 0


def _kill_in(workspace, repro, stage):
    """Waits until `stage` is under way in `repro`, kills the process group; returns what it saw."""
    repro.wait_until(lambda: f"Running stage '{stage}'" in repro.output, f"stage {stage} starting")
    started = time.monotonic()
    outputs = workspace.outputs(stage)
    if stage in TRAINING:
        checkpoint = workspace.root / f"checkpoints/{stage}.safetensors"
        every = workspace.param("checkpoint_every", stage)
        # Half-way between two checkpoints, so the rerun has steps to redo.
        repro.wait_until(
            lambda: checkpoint.exists() and _steps_done(repro.output, stage) >= every * 3 // 2,
            f"{stage} passing step {every * 3 // 2} with a checkpoint",
        )
    else:
        repro.wait_until(
            lambda: _temporaries(workspace, outputs) or time.monotonic() - started > DELAY_S[stage],
            f"{stage} writing",
            interval=0.001,
        )
    temporaries = _temporaries(workspace, outputs)
    returncode = repro.kill()
    return {
        "stage": stage,
        "returncode": returncode,
        "after_s": round(time.monotonic() - started, 2),
        "temporaries": temporaries,
        "output": repro.output,
    }


def _checkpoint_state(path):
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    load_file(path)  # every tensor reads back: the file is whole
    return int(metadata["step"]), metadata["complete"] == "1"


def _unfinished_outputs(workspace, reference, stage):
    """Files of the killed stage's outputs (but the live ones) that exist but differ from the uninterrupted run's."""
    paths = [path for path in workspace.outputs(stage) if path not in LIVE_OUTPUTS]
    expected = reference.digests(paths)
    return sorted(path for path, digest in workspace.digests(paths).items() if expected.get(path) != digest)


@pytest.fixture(scope="module")
def kills(short_pipeline, tmp_path_factory):
    """Runs the chain of killed `dvc repro`s and the final one; returns (observations, final output, copy)."""
    reference, _ = short_pipeline
    workspace = clone_workspace(reference, tmp_path_factory, "killed-pipeline")
    observations = []
    for stage in KILLED:
        seen = _kill_in(workspace, Repro(workspace), stage)
        if observations:
            observations[-1]["rerun_output"] = seen["output"]  # the run after a kill reruns the killed stage
        seen["unfinished"] = _unfinished_outputs(workspace, reference, stage)
        seen["status"] = workspace.status()
        if stage in TRAINING:
            seen["checkpoint"] = _checkpoint_state(workspace.root / f"checkpoints/{stage}.safetensors")
        observations.append(seen)
    final = Repro(workspace).finish()
    observations[-1]["rerun_output"] = final
    for seen in observations:
        checkpoint = f", checkpoint at step {seen['checkpoint'][0]}" if "checkpoint" in seen else ""
        print(
            f"killed {seen['stage']} {seen['after_s']} s after it started, temporary outputs "
            f"{seen['temporaries'] or 'none'}{checkpoint}; reported changed: {seen['stage'] in seen['status']}"
        )
    return observations, final, workspace


def test_every_kill_lands_while_its_stage_runs(kills):
    observations, _, _ = kills
    for seen in observations:
        assert seen["returncode"] == -signal.SIGKILL, seen["output"][-3000:]
        assert stages_that_ran(seen["output"]) >= {seen["stage"]}


def test_no_output_of_a_killed_stage_looks_finished(kills):
    observations, _, _ = kills
    for seen in observations:
        assert seen["unfinished"] == [], f"{seen['stage']}: half-written outputs {seen['unfinished']}"
        assert seen["stage"] in seen["status"], f"{seen['stage']} was killed but dvc status calls it up to date"


def test_the_next_repro_reruns_the_killed_stage(kills):
    observations, _, _ = kills
    for seen in observations:
        assert seen["stage"] in stages_that_ran(seen["rerun_output"]), seen["rerun_output"][-3000:]


def test_killed_training_leaves_a_whole_checkpoint_and_resumes_from_it(kills):
    observations, _, workspace = kills
    for seen in (seen for seen in observations if seen["stage"] in TRAINING):
        stage, (step, complete) = seen["stage"], seen["checkpoint"]
        every, steps = workspace.param("checkpoint_every", stage), workspace.param(stage, "steps")
        assert not complete and 0 < step < steps and step % every == 0, seen["checkpoint"]
        assert f"{stage}: resuming from step {step} (checkpoints/{stage}.safetensors)" in seen["rerun_output"]
        logged = [int(n) for n in re.findall(rf"^{stage}: step (\d+)/{steps}", seen["rerun_output"], re.MULTILINE)]
        log_every = workspace.param(stage, "log_every")
        assert logged and logged[0] == step + log_every, f"the rerun's first progress line follows step {step}"


def test_pipeline_completes_with_nothing_left_to_run_or_clean_up(kills):
    _, final, workspace = kills
    assert stages_that_ran(final) == {KILLED[-1]}, final[-3000:]
    assert workspace.status() == {}
    leftovers = [path for path in workspace.root.rglob(".*.tmp-*") if ".git" not in path.parts]
    assert leftovers == []


def _checkpoints_without_timing(workspace):
    """The checkpoints' tensors and metadata, without throughput in the logged history."""
    contents = {}
    for path in CHECKPOINTS:
        with safe_open(workspace.root / path, framework="pt") as f:
            metadata = f.metadata()
        history = [
            {key: value for key, value in row.items() if key not in WALL_CLOCK_FIGURES}
            for row in json.loads(metadata.pop("history"))
        ]
        tensors = {name: tensor.numpy().tobytes() for name, tensor in load_file(workspace.root / path).items()}
        contents[path] = {"metadata": metadata, "history": history, "tensors": tensors}
    return contents


def test_final_lock_and_outputs_equal_the_uninterrupted_run(kills, short_pipeline):
    _, _, workspace = kills
    reference, reference_lock = short_pipeline
    lock = workspace.lock()
    assert lock.keys() == reference_lock.keys() and lock["stages"].keys() == reference_lock["stages"].keys()
    for stage, entry in reference_lock["stages"].items():  # stage by stage, so that a failure names one
        assert lock["stages"][stage] == entry, stage
    assert _checkpoints_without_timing(workspace) == _checkpoints_without_timing(reference)
    outputs = [path for stage in workspace.stages() for path in workspace.outputs(stage)]
    assert workspace.digests(outputs) == reference.digests(outputs)
