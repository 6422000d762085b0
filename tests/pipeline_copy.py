"""A scratch copy of the repository to run `dvc` in, shared by the pipeline tests.

The copy holds the repository's tracked and untracked-not-ignored files (no outputs, no DVC cache, no
checkpoints) in a fresh git repository with one commit: dvclive, which the training stages use, fails in a
repository without commits. Every command runs with the test's Python environment first on PATH, DVC
analytics off, a private DVC site cache and the Hugging Face libraries offline.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.paths import REPO_ROOT

RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)

# Training short enough for a whole `dvc repro` of the sample profile in well under a minute on 2 cores,
# with checkpoints every 10 steps and a progress line every 5, so that a run can be killed between two of them.
SHORT_TRAINING = {
    "pretrain": {"steps": 60, "log_every": 5, "eval_every": 30, "eval_batches": 4},
    "finetune": {"steps": 30, "log_every": 5, "eval_every": 30, "eval_batches": 4},
    "checkpoint_every": {"pretrain": 10, "finetune": 10},
    "evaluate": {"eval_batches": 4, "max_new_tokens": 16},
}


def stages_that_ran(output):
    """Names of the stages that DVC's output says it ran."""
    return set(RAN.findall(output))


class Workspace:
    def __init__(self, root, home):
        self.root = Path(root)
        self.home = Path(home)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "DVC_"))}
        self.env.update(
            PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            DVC_NO_ANALYTICS="1",
            DVC_SITE_CACHE_DIR=str(self.home / "dvc-site-cache"),
            HF_HOME=str(self.home / "hf"),
            HF_HUB_OFFLINE="1",  # the sample profile reads local folders only; never the network
            HF_DATASETS_OFFLINE="1",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.env.pop("PYTHONPATH", None)

    def run(self, *args, merge_stderr=True, timeout=600):
        result = subprocess.run(
            args,
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
        output = result.stdout + (result.stderr or "")
        assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output[-6000:]}"
        return result.stdout

    def dvc_command(self, *args):
        """The argument list that runs `dvc ARGS` with the test's Python."""
        return [sys.executable, "-m", "dvc", *args]

    def dvc(self, *args, merge_stderr=True, timeout=600):
        return self.run(*self.dvc_command(*args), merge_stderr=merge_stderr, timeout=timeout)

    def status(self, *targets):
        """`dvc status --json`: {stage: changes}, empty when everything is up to date."""
        return json.loads(self.dvc("status", "--json", *targets, merge_stderr=False))

    def set_param(self, section, key, value):
        self.set_params({section: {key: value}})

    def set_params(self, changes):
        """Merges {section: {key: value}} into params.yaml."""
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
        for section, values in changes.items():
            params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    def param(self, section, key):
        return yaml.safe_load((self.root / "params.yaml").read_text(encoding="utf-8"))[section][key]

    def json(self, relative):
        return json.loads((self.root / relative).read_text(encoding="utf-8"))

    def lock(self):
        return yaml.safe_load((self.root / "dvc.lock").read_text(encoding="utf-8"))

    def stages(self):
        return yaml.safe_load((self.root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

    def outputs(self, stage):
        """{path: entry options} of every out, metric and plot that `stage` declares in dvc.yaml."""
        paths = {}
        for kind in ("outs", "metrics", "plots"):
            for entry in self.stages()[stage].get(kind, []):
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                paths[path] = options or {}
        return paths

    def digests(self, relative_paths):
        """sha256 of every file under each of `relative_paths` (files or folders) that exists, by path."""
        digests = {}
        for relative in relative_paths:
            path = self.root / relative
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                if file.is_file():
                    digests[file.relative_to(self.root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
        return digests

    def commit(self, message):
        git_commit(self.root, message)


def git_commit(root, message):
    """Commits everything in `root` (a new repository if there is none) under a placeholder identity."""
    if not (Path(root) / ".git").exists():
        subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "add", "--all"], cwd=root, check=True)
    subprocess.run(["git", *identity, "commit", "--quiet", "--allow-empty", "-m", message], cwd=root, check=True)


def copy_repo(root):
    """Copies the repository's tracked and untracked-not-ignored files into `root`."""
    root = Path(root)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode("utf-8")
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file() and not source.is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


def make_workspace(tmp_path_factory, name="repo", params=None, workspace_class=Workspace):
    """A fresh copy of the repository in a git repository of its own, with `params` ({section: {key: value}})
    merged into its params.yaml before the first commit."""
    workspace = workspace_class(copy_repo(tmp_path_factory.mktemp(name)), tmp_path_factory.mktemp(f"{name}-home"))
    if params:
        workspace.set_params(params)
    workspace.commit("copy of the repository")
    return workspace


def clone_workspace(workspace, tmp_path_factory, name):
    """A `git clone` of `workspace`'s last commit, with a home of its own: the same sources and params (even
    if the repository changes meanwhile), but none of its outputs, DVC cache or local config."""
    root = tmp_path_factory.mktemp(name)
    subprocess.run(["git", "clone", "--quiet", str(workspace.root), str(root)], check=True)
    return type(workspace)(root, tmp_path_factory.mktemp(f"{name}-home"))
