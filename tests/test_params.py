"""params.yaml schema: the shipped profiles load, and every bad value fails with an error naming its key."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model import profiles
from model.errors import PipelineError
from model.params import MAX_UINT16_VOCAB, MIN_VOCAB, Params, ParamsError, load_params, parse_params
from model.profiles import profile_text
from tests.paths import REPO_ROOT


@pytest.fixture
def raw():
    """A valid params mapping to break one key at a time: the repo's own params.yaml as YAML reads it."""
    with open(REPO_ROOT / "params.yaml", encoding="utf-8") as f:
        return copy.deepcopy(yaml.safe_load(f))


def _error(raw):
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def profile(name):
    """configs/NAME.yaml resolved as `make profile NAME=...` writes it."""
    return parse_params(yaml.safe_load(profile_text(REPO_ROOT / "configs" / f"{name}.yaml")))


def test_load_params_accepts_the_sample_profile():
    assert isinstance(load_params(REPO_ROOT / "params.yaml"), Params)


@pytest.mark.parametrize("name", ["ryangpt", "ryangpt-fast", "ryangpt-unique"])
def test_the_shipped_profiles_resolve_to_valid_params(name):
    params = profile(name)
    assert isinstance(params, Params)
    assert MIN_VOCAB <= params.tokenizer.vocab_size <= MAX_UINT16_VOCAB


def test_parse_params_returns_the_values_of_the_mapping(raw):
    params = parse_params(raw)
    assert params.seed == raw["seed"]
    assert params.wikipedia.max_bytes == raw["wikipedia"]["max_bytes"]
    assert params.tokenizer.vocab_size == raw["tokenizer"]["vocab_size"]
    assert params.combine.val_fraction == pytest.approx(raw["combine"]["val_fraction"])


def test_unknown_top_level_key_is_named(raw):
    raw["tokeniser"] = {"vocab_size": 1024}
    assert "tokeniser" in _error(raw)


def test_unknown_key_in_a_section_is_named_with_its_section(raw):
    raw["wikipedia"]["maxbytes"] = 1000
    assert "wikipedia.maxbytes" in _error(raw)


def test_missing_key_in_a_section_is_named(raw):
    del raw["c4"]["min_chars"]
    message = _error(raw)
    assert "c4.min_chars" in message
    assert "missing" in message


def test_missing_section_is_named(raw):
    del raw["combine"]
    message = _error(raw)
    assert "combine" in message
    assert "missing" in message


def test_string_where_an_integer_belongs_is_named(raw):
    raw["tokenizer"]["vocab_size"] = "2048"
    assert "tokenizer.vocab_size" in _error(raw)


def test_bool_where_an_integer_belongs_is_named(raw):
    raw["wikipedia"]["min_chars"] = True
    assert "wikipedia.min_chars" in _error(raw)


def test_bool_seed_is_rejected(raw):
    raw["seed"] = False
    assert "seed" in _error(raw)


@pytest.mark.parametrize("section", ["wikipedia", "c4"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_max_bytes_is_named(raw, section, value):
    raw[section]["max_bytes"] = value
    assert f"{section}.max_bytes" in _error(raw)


@pytest.mark.parametrize("value", [MIN_VOCAB - 1, MAX_UINT16_VOCAB + 1])
def test_vocab_size_outside_uint16_range_is_named(raw, value):
    raw["tokenizer"]["vocab_size"] = value
    assert "tokenizer.vocab_size" in _error(raw)


@pytest.mark.parametrize("value", [MIN_VOCAB, MAX_UINT16_VOCAB])
def test_vocab_size_bounds_are_inclusive(raw, value):
    raw["tokenizer"]["vocab_size"] = value
    assert parse_params(raw).tokenizer.vocab_size == value


@pytest.mark.parametrize("value", [0, 0.5, 0.7])
def test_val_fraction_outside_open_interval_is_named(raw, value):
    raw["combine"]["val_fraction"] = value
    assert "combine.val_fraction" in _error(raw)


def test_empty_string_source_is_named(raw):
    raw["dialog"]["source"] = ""
    assert "dialog.source" in _error(raw)


# Task scores


def test_an_unknown_task_is_named_with_the_suite(raw):
    raw["task_scores"]["tasks"]["mmlu"] = "data/sample/mmlu"
    assert _error(raw) == (
        "params.yaml: task_scores.tasks.mmlu is not a known key; valid keys of task_scores.tasks: "
        "blimp, lambada_openai, piqa, arc_easy, hellaswag"
    )


def test_a_task_without_a_source_is_named(raw):
    del raw["task_scores"]["tasks"]["piqa"]
    assert _error(raw) == "params.yaml: task_scores.tasks.piqa is missing"


@pytest.mark.parametrize("key, value", [("limit", -1), ("batch_size", 0), ("device", "tpu"), ("limit", 1.5)])
def test_a_bad_task_scores_value_is_named(raw, key, value):
    raw["task_scores"][key] = value
    assert f"task_scores.{key}" in _error(raw)


def test_a_limit_of_zero_scores_every_item(raw):
    assert parse_params(raw).task_scores.limit == 0


@pytest.mark.parametrize("name", ["ryangpt", "ryangpt-fast", "ryangpt-unique"])
def test_the_ryangpt_profiles_score_every_item_of_every_task_from_the_hub(name):
    scores = profile(name).task_scores
    assert scores.limit == 0
    assert all(
        Path(REPO_ROOT / getattr(scores.tasks, task) / "hub.json").is_file()
        for task in ("blimp", "lambada_openai", "piqa", "arc_easy", "hellaswag")
    )


# Training and model params


@pytest.mark.parametrize("steps", [0, -5])
def test_non_positive_steps_is_an_error_naming_the_key(raw, steps):
    raw["pretrain"]["steps"] = steps
    assert "pretrain.steps" in _error(raw)


def test_warmup_longer_than_training_is_an_error_naming_the_key(raw):
    raw["finetune"]["warmup_steps"] = raw["finetune"]["steps"] + 1
    assert "finetune.warmup_steps" in _error(raw)


def test_min_lr_above_lr_is_an_error_naming_the_key(raw):
    raw["pretrain"]["min_lr"] = raw["pretrain"]["lr"] * 2
    assert "pretrain.min_lr" in _error(raw)


def test_unknown_device_is_an_error_naming_the_key(raw):
    raw["finetune"]["device"] = "tpu"
    message = _error(raw)
    assert "finetune.device" in message
    assert "tpu" in message


def test_the_shipped_training_params_pass_the_checks(raw):
    params = parse_params(raw)
    assert params.pretrain.warmup_steps <= params.pretrain.steps
    assert params.finetune.min_lr <= params.finetune.lr


@pytest.mark.parametrize(
    "section, key, value, valid",
    [
        ("pretrain", "optimizer", "sgd", "muon, adamw"),
        ("finetune", "optimizer", "Muon", "muon, adamw"),
        ("pretrain", "schedule", "linear", "wsd, cosine"),
        ("pretrain", "init", "xavier", "gpt2, zero_out, reference"),
    ],
)
def test_unknown_recipe_name_is_an_error_naming_the_key_and_the_valid_names(raw, section, key, value, valid):
    raw[section][key] = value
    message = _error(raw)
    assert f"{section}.{key}" in message
    assert valid in message


@pytest.mark.parametrize("key", ["lr", "embed_lr", "matrix_lr"])
@pytest.mark.parametrize("value", [0, -1e-3])
def test_learning_rate_of_zero_or_below_is_an_error_naming_the_key(raw, key, value):
    raw["pretrain"][key] = value
    assert f"pretrain.{key}" in _error(raw)


@pytest.mark.parametrize("value", [0, -0.1, 1.01])
def test_decay_fraction_outside_zero_to_one_is_an_error_naming_the_key(raw, value):
    raw["finetune"]["decay_fraction"] = value
    assert "finetune.decay_fraction" in _error(raw)


def test_decay_fraction_of_one_is_allowed(raw):
    raw["pretrain"]["decay_fraction"] = 1
    assert parse_params(raw).pretrain.decay_fraction == 1.0


def test_init_belongs_to_pretraining_only(raw):
    raw["finetune"]["init"] = "gpt2"
    assert "finetune.init" in _error(raw)


def test_the_reference_profile_runs_the_reference_recipe():
    params = profile("ryangpt")
    for section in (params.pretrain, params.finetune):
        assert (section.optimizer, section.schedule, section.beta1, section.beta2) == ("adamw", "cosine", 0.9, 0.99)
        assert section.weight_decay == 0.1
        assert section.min_lr == pytest.approx(section.lr / 10)
    assert (params.pretrain.lr, params.pretrain.warmup_steps, params.pretrain.init) == (6e-4, 2000, "reference")
    assert params.finetune.lr == 3e-5


def test_the_fast_profile_differs_from_the_reference_in_the_recipe_only():
    reference, fast = profile("ryangpt"), profile("ryangpt-fast")
    assert fast.model_copy(update={"pretrain": reference.pretrain}) == reference
    assert (fast.pretrain.optimizer, fast.pretrain.schedule) == ("muon", "wsd")
    for field in ("steps", "batch_size", "grad_accum"):  # the same token budget
        assert getattr(fast.pretrain, field) == getattr(reference.pretrain, field)


def test_the_unique_profile_differs_from_the_fast_one_in_the_data_caps_only():
    fast, unique = profile("ryangpt-fast"), profile("ryangpt-unique")
    assert unique.model_copy(update={"wikipedia": fast.wikipedia, "c4": fast.c4}) == fast
    assert unique.wikipedia.max_bytes + unique.c4.max_bytes > 7 * (fast.wikipedia.max_bytes + fast.c4.max_bytes)


def test_make_profile_writes_the_resolved_profile_with_its_comments(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    for name in ("ryangpt.yaml", "ryangpt-fast.yaml"):
        (tmp_path / "configs" / name).write_text((REPO_ROOT / "configs" / name).read_text())
    monkeypatch.chdir(tmp_path)
    profiles.main("ryangpt-fast")
    text = (tmp_path / "params.yaml").read_text()
    assert text.startswith("# The RyanGPT-fast profile")
    assert "lr: 3.0e-3                     # AdamW peak: the output head and the norm gains" in text
    assert "base:" not in text
    assert load_params(tmp_path / "params.yaml") == profile("ryangpt-fast")


def test_an_invalid_profile_is_refused_and_params_yaml_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ryangpt.yaml").write_text((REPO_ROOT / "configs" / "ryangpt.yaml").read_text())
    (tmp_path / "configs" / "bad.yaml").write_text("base: ryangpt.yaml\npretrain:\n  optimizer: sgd\n")
    (tmp_path / "params.yaml").write_text("untouched")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="pretrain.optimizer"):
        profiles.main("bad")
    with pytest.raises(PipelineError, match="the profiles in configs: bad, ryangpt"):
        profiles.main("missing")
    assert (tmp_path / "params.yaml").read_text() == "untouched"


def test_a_stage_reports_a_bad_param_in_one_line_without_a_traceback(raw, tmp_path):
    raw["foo"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "stages.combine", "a", "b", "c", "d"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: foo is not a known key; valid keys of (top level): seed, wikipedia, c4, dialog, "
        "combine, tokenizer, model, pretrain, finetune, checkpoint_every, evaluate, task_scores"
    ]


@pytest.mark.parametrize("target", [["profile", "NAME=ryangpt-fast"], ["ryangpt"]])
def test_make_refuses_to_overwrite_a_locally_edited_params_yaml(tmp_path, target):
    """The real Makefile in a scratch git repository; `-o setup` skips the virtual environment."""
    for name in ("Makefile", "params.yaml"):
        (tmp_path / name).write_text((REPO_ROOT / name).read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "start"], check=True)
    edited = (tmp_path / "params.yaml").read_text().replace("seed: ", "seed: 9", 1)
    (tmp_path / "params.yaml").write_text(edited)
    result = subprocess.run(
        ["make", "-s", "-o", "setup", "-C", str(tmp_path), *target],
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": "-o setup"},
        timeout=60,
    )
    assert result.returncode != 0
    assert "params.yaml has local edits" in result.stdout + result.stderr
    assert (tmp_path / "params.yaml").read_text() == edited
