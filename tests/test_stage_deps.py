"""dvc.yaml's deps are exact: each stage's code deps are its script's imports within the project,
followed to the end, and the training stages declare every training param but checkpoint_every.

DVC reruns a stage when a listed dep changes, so a library file the stage imports but dvc.yaml omits is a
change DVC silently skips, and a listed param that cannot change the outputs reruns hours of training for
nothing. The package __init__ files hold only a docstring and are left out.
"""

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from model.params import PretrainParams, TaskSourcesParams, TrainParams

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "stages")


def project_imports(path):
    """The project modules (as file paths relative to the repo) that the file at `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                candidate = Path(*name.split(".")).with_suffix(".py")
                if (REPO_ROOT / candidate).is_file():
                    found.add(candidate.as_posix())
    return found


def import_closure(script):
    """`script` and every project file it reaches through imports."""
    seen, todo = set(), [script]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(project_imports(REPO_ROOT / current))
    return seen


def stages():
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_script(command):
    """stages/NAME.py of a `python -m stages.NAME ...` command."""
    module = command.split()[command.split().index("-m") + 1]
    return Path(*module.split(".")).with_suffix(".py").as_posix()


def test_the_closure_follows_imports_through_the_library():
    closure = import_closure("stages/evaluate.py")
    assert {"model/evaluation.py", "model/batches.py", "model/gpt.py", "model/files.py"} <= closure
    assert "model/training.py" not in closure  # evaluation does not depend on the training loop


@pytest.mark.parametrize("name", list(stages()))
def test_stage_code_deps_are_exactly_its_import_closure(name):
    stage = stages()[name]
    expected = import_closure(stage_script(stage["cmd"]))
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    assert listed == expected, (f"dvc.yaml stage {name}: code deps should be {sorted(expected)}; "
                                f"missing {sorted(expected - listed)}, extra {sorted(listed - expected)}")


@pytest.mark.parametrize("name, section_class", [("pretrain", PretrainParams), ("finetune", TrainParams)])
def test_training_stages_declare_every_training_param_but_checkpoint_every(name, section_class):
    declared = set(stages()[name]["params"])
    assert {f"{name}.{f.name}" for f in fields(section_class)} - declared == {f"{name}.checkpoint_every"}
    assert "seed" in declared and name not in declared  # key by key, never the whole section


SOURCE_SECTIONS = {"extract_wikipedia": "wikipedia", "extract_c4": "c4", "extract_dialog": "dialog"}


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))])
def test_every_profiles_extract_deps_are_its_sources(profile):
    """The extract stages depend on `${SECTION.source}`, so their deps follow the profile; every profile's sources
    must then be folders DVC can hash: a local folder, or a hub pin folder (data/hub/*/hub.json)."""
    from model.profiles import resolve

    params = yaml.safe_load((REPO_ROOT / profile).read_text()) if profile == "params.yaml" else resolve(
        REPO_ROOT / "configs" / profile)
    for stage, section in SOURCE_SECTIONS.items():
        assert f"${{{section}.source}}" in stages()[stage]["deps"]
        assert (REPO_ROOT / params[section]["source"]).is_dir(), f"{profile}: {section}.source"


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))])
def test_every_profiles_task_scores_deps_are_its_task_sources(profile):
    """task_scores depends on each task's `${task_scores.tasks.TASK}`, one dep per task of the suite, so its deps follow
    the profile as the extract stages' do; every profile's task sources are folders DVC can hash."""
    from model.profiles import resolve

    params = yaml.safe_load((REPO_ROOT / profile).read_text()) if profile == "params.yaml" else resolve(
        REPO_ROOT / "configs" / profile)
    source_deps = [dep for dep in stages()["task_scores"]["deps"] if dep.startswith("${")]
    assert source_deps == [f"${{task_scores.tasks.{field.name}}}" for field in fields(TaskSourcesParams)]
    for field in fields(TaskSourcesParams):
        assert (REPO_ROOT / params["task_scores"]["tasks"][field.name]).is_dir(), f"{profile}: {field.name}"
