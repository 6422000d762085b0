"""dvc.yaml's deps are exact: each stage's code deps are its script's imports within the project,
followed to the end, and the training stages declare their training sections whole but not checkpoint_every.

DVC reruns a stage when a listed dep changes, so a library file the stage imports but dvc.yaml omits is a
change DVC silently skips, and a listed param that cannot change the outputs reruns hours of training for
nothing. The package __init__ files hold only a docstring and are left out.
"""

import ast
from pathlib import Path

import pytest
import yaml

from model.params import Params, TaskSourcesParams
from tests.paths import REPO_ROOT

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
    assert listed == expected, (
        f"dvc.yaml stage {name}: code deps should be {sorted(expected)}; "
        f"missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"
    )


DATA = {"extract_wikipedia", "extract_c4", "extract_dialog", "combine", "build_bpe", "encode"}
EVERY_STAGE = DATA | {"pretrain", "finetune", "evaluate", "export", "gguf", "task_scores"}
# The stages an edit to each library file reruns (those that list it; what follows them reruns only where an
# output changed). The intended map, kept by hand: a change to it is a decision about what an edit costs.
INTENDED_RERUNS = {
    "model/batches.py": {"pretrain", "finetune", "evaluate"},
    "model/completions.py": {"evaluate"},
    "model/corpus.py": {"extract_wikipedia", "extract_c4", "combine", "build_bpe", "encode"},
    "model/dialog.py": {"extract_dialog", "build_bpe", "encode", "evaluate"},
    "model/encoding.py": {"encode"},
    "model/errors.py": EVERY_STAGE,
    "model/evaluation.py": {"pretrain", "finetune", "evaluate"},
    "model/export.py": {"export"},
    "model/files.py": EVERY_STAGE,
    "model/generate.py": {"evaluate"},
    "model/gpt.py": {"pretrain", "finetune", "evaluate", "export"},
    "model/llamacpp.py": {"gguf"},
    "model/llama_server.py": set(),
    "model/params.py": EVERY_STAGE - {"encode", "gguf"},
    "model/profiles.py": set(),
    "model/sources.py": {"extract_wikipedia", "extract_c4", "extract_dialog", "task_scores"},
    "model/special_tokens.py": {"extract_dialog", "build_bpe", "encode", "evaluate", "export", "gguf", "task_scores"},
    "model/task_scores.py": {"task_scores"},
    "model/token_arrays.py": {"encode", "pretrain", "finetune", "evaluate", "export"},
    "model/tokenizer.py": {"build_bpe", "encode", "evaluate"},
    "model/training.py": {"pretrain", "finetune"},
}


def reruns(path):
    return {name for name, stage in stages().items() if path in stage["deps"]}


def project_files():
    return sorted(
        p.relative_to(REPO_ROOT).as_posix()
        for folder in ("model", "stages", "serve")
        for p in (REPO_ROOT / folder).rglob("*.py")
        if p.name != "__init__.py"
    )


@pytest.mark.parametrize("path", project_files())
def test_an_edit_reruns_the_stages_intended(path):
    """Every file under model/, stages/ and serve/: a stage script reruns its stage, the server reruns nothing,
    a library file the stages of INTENDED_RERUNS (which the deps test above ties to the imports)."""
    if path.startswith("stages/"):
        expected = {Path(path).stem}
    elif path.startswith("serve/"):
        expected = set()
    else:
        expected = INTENDED_RERUNS[path]
    assert reruns(path) == expected


def test_the_intended_map_names_every_library_file():
    assert sorted(INTENDED_RERUNS) == [path for path in project_files() if path.startswith("model/")]


def test_sampling_and_serving_edits_rerun_no_training_and_corpus_cleaning_reruns_the_data():
    training = {"pretrain", "finetune"}
    for path in [
        "model/generate.py",
        "model/completions.py",
        "model/tokenizer.py",
        *(p for p in project_files() if p.startswith("serve/")),
    ]:
        assert not reruns(path) & training, path
    assert {"extract_wikipedia", "extract_c4"} <= reruns("model/corpus.py") <= DATA
    assert "model/corpus.py" not in import_closure("stages/pretrain.py")


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_training_stages_list_their_section_whole_and_not_the_checkpoint_frequency(name):
    """A new training key reruns its stage with no edit of dvc.yaml; a new checkpoint frequency reruns nothing."""
    declared = stages()[name]["params"]
    assert "seed" in declared and name in declared
    assert not [param for param in declared if param.startswith(f"{name}.")]  # never key by key
    assert "checkpoint_every" in Params.model_fields  # the real name, so the check below cannot pass vacuously
    assert not [param for param in declared if param.split(".")[0] == "checkpoint_every"]


SOURCE_SECTIONS = {"extract_wikipedia": "wikipedia", "extract_c4": "c4", "extract_dialog": "dialog"}


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))])
def test_every_profiles_extract_deps_are_its_sources(profile):
    """The extract stages depend on `${SECTION.source}`, so their deps follow the profile; every profile's sources
    must then be folders DVC can hash: a local folder, or a hub pin folder (data/hub/*/hub.json)."""
    from model.profiles import resolve

    params = (
        yaml.safe_load((REPO_ROOT / profile).read_text())
        if profile == "params.yaml"
        else resolve(REPO_ROOT / "configs" / profile)
    )
    for stage, section in SOURCE_SECTIONS.items():
        assert f"${{{section}.source}}" in stages()[stage]["deps"]
        assert (REPO_ROOT / params[section]["source"]).is_dir(), f"{profile}: {section}.source"


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))])
def test_every_profiles_task_scores_deps_are_its_task_sources(profile):
    """task_scores depends on each task's `${task_scores.tasks.TASK}`, one dep per task of the suite, so its deps follow
    the profile as the extract stages' do; every profile's task sources are folders DVC can hash."""
    from model.profiles import resolve

    params = (
        yaml.safe_load((REPO_ROOT / profile).read_text())
        if profile == "params.yaml"
        else resolve(REPO_ROOT / "configs" / profile)
    )
    source_deps = [dep for dep in stages()["task_scores"]["deps"] if dep.startswith("${")]
    assert source_deps == [f"${{task_scores.tasks.{task}}}" for task in TaskSourcesParams.model_fields]
    for task in TaskSourcesParams.model_fields:
        assert (REPO_ROOT / params["task_scores"]["tasks"][task]).is_dir(), f"{profile}: {task}"
