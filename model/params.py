"""params.yaml: its schema, and the checks that run before any stage does work.

Every section is a frozen dataclass. `load_params` rejects unknown or missing keys, wrong types
and out-of-range values with an error naming the key, so a typo fails in a second instead of
after an hour of training.
"""

from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

import yaml

from model.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
MAX_UINT16_VOCAB = 2**16
# 256 byte-fallback pieces + <unk> + 3 special tokens, plus room for learned merges.
MIN_VOCAB = 512


class ParamsError(PipelineError, ValueError):
    """A value in params.yaml that no stage can run with."""


def _require(condition, key, message):
    if not condition:
        raise ParamsError(f"params.yaml: {key} {message}")


@dataclass(frozen=True)
class WikipediaParams:
    source: str  # a local folder in the hub's layout, or a hub pin folder (data/hub/wikipedia)
    data_dir: str
    max_bytes: int
    min_chars: int

    def check(self, key):
        _require(self.max_bytes > 0, f"{key}.max_bytes", f"must be a positive byte count, got {self.max_bytes}")
        _require(self.min_chars >= 0, f"{key}.min_chars", f"must be >= 0, got {self.min_chars}")


@dataclass(frozen=True)
class C4Params:
    source: str  # a local folder in the hub's layout, or a hub pin folder (data/hub/c4)
    data_files: str
    max_bytes: int
    min_chars: int

    check = WikipediaParams.check


@dataclass(frozen=True)
class DialogParams:
    source: str  # a local folder holding the split zips, or a hub pin folder (data/hub/dailydialog)


@dataclass(frozen=True)
class CombineParams:
    val_fraction: float

    def check(self, key):
        _require(0 < self.val_fraction < 0.5, f"{key}.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")


@dataclass(frozen=True)
class TokenizerParams:
    vocab_size: int
    max_sentences: int  # BPE trains on a seeded sample of at most this many lines

    def check(self, key):
        _require(
            MIN_VOCAB <= self.vocab_size <= MAX_UINT16_VOCAB,
            f"{key}.vocab_size",
            f"must be between {MIN_VOCAB} (room for the 256 byte pieces and the special tokens) "
            f"and {MAX_UINT16_VOCAB} (token ids are stored as uint16), got {self.vocab_size}",
        )
        _require(self.max_sentences > 0, f"{key}.max_sentences", f"must be positive, got {self.max_sentences}")


@dataclass(frozen=True)
class ModelParams:
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    context_length: int
    tie_embeddings: bool  # share the input embedding with the output head
    rope_theta: float
    norm_eps: float

    def check(self, key):
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "context_length"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", f"must be positive, got {value}")
        _require(self.d_model % self.n_heads == 0, f"{key}.d_model",
                 f"({self.d_model}) must be divisible by {key}.n_heads ({self.n_heads})")
        _require((self.d_model // self.n_heads) % 2 == 0, f"{key}.n_heads",
                 f"must leave an even head size for rotary embeddings, got d_model / n_heads = "
                 f"{self.d_model / self.n_heads}")
        _require(self.rope_theta > 0, f"{key}.rope_theta", f"must be positive, got {self.rope_theta}")
        _require(0 < self.norm_eps < 1, f"{key}.norm_eps", f"must be in (0, 1), got {self.norm_eps}")


OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("wsd", "cosine")
INITS = ("gpt2", "zero_out", "reference")


@dataclass(frozen=True)
class TrainParams:
    steps: int
    batch_size: int  # sequences per micro-batch, across all processes
    grad_accum: int  # micro-batches per optimizer step
    optimizer: str  # muon: Muon on hidden matrices, AdamW on the rest; adamw: AdamW on everything
    lr: float  # AdamW's peak learning rate (with muon: the output head and the norm gains)
    embed_lr: float  # with muon: AdamW's peak learning rate of the token embedding
    matrix_lr: float  # with muon: Muon's peak learning rate of the hidden matrices
    schedule: str  # wsd: warmup, stable, linear decay; cosine: warmup, cosine decay
    min_lr: float  # the schedule ends at min_lr / lr of every group's peak
    warmup_steps: int
    decay_fraction: float  # wsd: the final fraction of steps that decays linearly to min_lr
    weight_decay: float  # decoupled; on matrices only (never on norm gains)
    beta1: float
    beta2: float
    grad_clip: float
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    device: str  # auto (CUDA when present), cpu or cuda
    bf16: bool  # bf16 autocast on CUDA; CPU always trains in fp32
    compile: bool  # torch.compile on CUDA

    def check(self, key):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", f"must be positive, got {value}")
        _require(self.optimizer in OPTIMIZERS, f"{key}.optimizer",
                 f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _require(self.schedule in SCHEDULES, f"{key}.schedule",
                 f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("lr", "embed_lr", "matrix_lr"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", f"must be a positive learning rate, got {value}")
        _require(0 <= self.min_lr <= self.lr, f"{key}.min_lr", f"must be in [0, {key}.lr = {self.lr}], got {self.min_lr}")
        _require(0 <= self.warmup_steps <= self.steps, f"{key}.warmup_steps",
                 f"must be in [0, {key}.steps = {self.steps}], got {self.warmup_steps}")
        _require(0 < self.decay_fraction <= 1, f"{key}.decay_fraction",
                 f"must be in (0, 1] (the share of steps spent decaying), got {self.decay_fraction}")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"{key}.{name}", f"must be in [0, 1), got {value}")
        _require(self.grad_clip > 0, f"{key}.grad_clip", f"must be positive, got {self.grad_clip}")
        # A resumed run restarts its loss average at the checkpoint: only then does it log what an
        # uninterrupted run logs.
        _require(self.checkpoint_every % self.log_every == 0, f"{key}.checkpoint_every",
                 f"must be a multiple of {key}.log_every ({self.log_every}), got {self.checkpoint_every}")
        _require(self.device in ("auto", "cpu", "cuda"), f"{key}.device",
                 f"must be one of auto, cpu, cuda, got {self.device!r}")


@dataclass(frozen=True)
class PretrainParams(TrainParams):
    # gpt2: N(0, 0.02), residual-branch outputs N(0, 0.02 / sqrt(2 n_layers));
    # zero_out: gpt2 with residual-branch outputs and an untied head starting at zero;
    # reference: RyanGPT's (embedding N(0, 1), linear layers Xavier-normal, both cut at 3 sigma)
    init: str

    def check(self, key):
        super().check(key)
        _require(self.init in INITS, f"{key}.init", f"must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    eval_batches: int
    max_new_tokens: int
    temperature: float
    top_k: int

    def check(self, key):
        for name in ("batch_size", "eval_batches", "max_new_tokens", "top_k"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", f"must be positive, got {value}")
        _require(self.temperature >= 0, f"{key}.temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")


@dataclass(frozen=True)
class TaskSourcesParams:
    """The data of each task of the suite (model/task_scores.py), keyed by lm-eval's task name: a local folder in
    the layout of the hub dataset the stock task reads, or a hub pin folder (data/hub/...)."""
    blimp: str  # nyu-mll/blimp: one config per paradigm, split train
    lambada_openai: str  # EleutherAI/lambada_openai: config default, split test
    piqa: str  # baber/piqa: split validation
    arc_easy: str  # allenai/ai2_arc: config ARC-Easy, split test
    hellaswag: str  # Rowan/hellaswag: split validation


@dataclass(frozen=True)
class TaskScoresParams:
    tasks: TaskSourcesParams
    limit: int  # items scored per task (per BLiMP paradigm): a seeded sample of those that fit; 0: all of them
    batch_size: int
    device: str  # auto (CUDA when present), cpu or cuda

    def check(self, key):
        _require(self.limit >= 0, f"{key}.limit", f"must be >= 0 (0 scores every item), got {self.limit}")
        _require(self.batch_size > 0, f"{key}.batch_size", f"must be positive, got {self.batch_size}")
        _require(self.device in ("auto", "cpu", "cuda"), f"{key}.device",
                 f"must be one of auto, cpu, cuda, got {self.device!r}")


@dataclass(frozen=True)
class Params:
    seed: int
    wikipedia: WikipediaParams
    c4: C4Params
    dialog: DialogParams
    combine: CombineParams
    tokenizer: TokenizerParams
    model: ModelParams
    pretrain: PretrainParams
    finetune: TrainParams
    evaluate: EvaluateParams
    task_scores: TaskScoresParams


def _type_name(kind):
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, kind.__name__)


def _check_type(key, value, kind):
    # bool is a subclass of int in Python, so it is excluded explicitly from numbers.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str) and value != "",
    }[kind]
    _require(ok, key, f"must be {_type_name(kind)}, got {value!r}")
    return float(value) if kind is float else value


def _build(cls, raw, key):
    where = key or "(top level)"
    _require(isinstance(raw, dict), where, f"must be a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for name in raw:
        _require(name in names, _join(key, name), f"is not a known key; valid keys of {where}: {', '.join(names)}")
    values = {}
    for name in names:
        _require(name in raw, _join(key, name), "is missing")
        kind = hints[name]
        if is_dataclass(kind):
            values[name] = _build(kind, raw[name], _join(key, name))
        else:
            values[name] = _check_type(_join(key, name), raw[name], kind)
    section = cls(**values)
    if hasattr(section, "check"):
        section.check(key)
    return section


def _join(key, name):
    return f"{key}.{name}" if key else name


def parse_params(raw):
    """Validates a params mapping (as read from YAML) into `Params`, or raises ParamsError."""
    return _build(Params, raw, "")


def load_params(path=PARAMS_FILE):
    with open(path, encoding="utf-8") as f:
        return parse_params(yaml.safe_load(f))
