"""params.yaml: its schema, and the checks that run before any stage does work.

Every section is a frozen pydantic model: strict types ("1" is not a number, true is not 1; an integer
is a fine float), no unknown keys, bounds on the fields and the rules between keys in validators.
`load_params` turns the first thing wrong into one line naming the key and what would be valid there,
so a typo fails in a second instead of after an hour of training.
"""

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)
from ruamel.yaml import YAML

from model.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
MAX_UINT16_VOCAB = 2**16
# 256 byte-fallback pieces + <unk> + 3 special tokens, plus room for learned merges.
MIN_VOCAB = 512

Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when present
Beta = Annotated[float, Field(ge=0, lt=1)]


class ParamsError(PipelineError, ValueError):
    """A value in params.yaml that no stage can run with."""


class RuleError(ValueError):
    """A broken rule between keys, raised by a section's validator; `key` is relative to that section."""

    def __init__(self, key, message):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


class Section(BaseModel):
    # Every string is a name or a path, never empty; no number is NaN or infinite.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, str_min_length=1, allow_inf_nan=False)


class TextSourceParams(Section):
    """What the two web-text sources share: where the data is, and which of its documents are kept."""

    source: str  # a local folder in the hub's layout, or a hub pin folder (data/hub/wikipedia, data/hub/c4)
    max_bytes: PositiveInt  # stop streaming once this much cleaned text is kept
    min_chars: NonNegativeInt  # shorter documents are dropped


class WikipediaParams(TextSourceParams):
    data_dir: str


class C4Params(TextSourceParams):
    data_files: str


class DialogParams(Section):
    source: str  # a local folder holding the split zips, or a hub pin folder (data/hub/dailydialog)


class CombineParams(Section):
    val_fraction: float = Field(gt=0, lt=0.5)


class TokenizerParams(Section):
    vocab_size: int = Field(
        ge=MIN_VOCAB,
        le=MAX_UINT16_VOCAB,
        description=("room for the 256 byte pieces and the special tokens; token ids are stored as uint16"),
    )
    max_sentences: PositiveInt  # BPE trains on a seeded sample of at most this many lines


class ModelParams(Section):
    """The architecture, Llama-shaped: what a profile chooses. model/gpt.py's GPTConfig adds the vocabulary
    size, which the tokenizer fixes."""

    n_layers: PositiveInt
    d_model: PositiveInt
    n_heads: PositiveInt
    d_ff: PositiveInt
    context_length: PositiveInt
    tie_embeddings: bool  # share the input embedding with the output head
    rope_theta: PositiveFloat
    norm_eps: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _heads_split_the_width_evenly(self):
        if self.d_model % self.n_heads:
            raise RuleError("d_model", f"({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_model // self.n_heads % 2:
            raise RuleError(
                "n_heads",
                f"must leave an even head size for rotary embeddings, got d_model / n_heads "
                f"= {self.d_model // self.n_heads}",
            )
        return self


class TrainParams(Section):
    steps: PositiveInt
    batch_size: PositiveInt  # sequences per micro-batch, across all processes
    grad_accum: PositiveInt  # micro-batches per optimizer step
    optimizer: Literal["muon", "adamw"]  # muon: Muon on hidden matrices, AdamW on the rest; adamw: AdamW on everything
    lr: PositiveFloat  # AdamW's peak learning rate (with muon: the output head and the norm gains)
    embed_lr: PositiveFloat  # with muon: AdamW's peak learning rate of the token embedding
    matrix_lr: PositiveFloat  # with muon: Muon's peak learning rate of the hidden matrices
    schedule: Literal["wsd", "cosine"]  # wsd: warmup, stable, linear decay; cosine: warmup, cosine decay
    min_lr: NonNegativeFloat  # the schedule ends at min_lr / lr of every group's peak
    warmup_steps: NonNegativeInt
    # wsd: the final fraction of steps that decays linearly to min_lr
    decay_fraction: float = Field(gt=0, le=1, description="the share of the steps spent decaying")
    weight_decay: NonNegativeFloat  # decoupled; on matrices only (never on norm gains)
    beta1: Beta
    beta2: Beta
    grad_clip: PositiveFloat
    log_every: PositiveInt
    eval_every: PositiveInt
    eval_batches: PositiveInt
    device: Device
    bf16: bool  # bf16 autocast on CUDA; CPU always trains in fp32
    compile: bool  # torch.compile on CUDA

    @model_validator(mode="after")
    def _schedule_fits_the_run(self):
        if self.min_lr > self.lr:
            raise RuleError("min_lr", f"must be at most lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps > self.steps:
            raise RuleError("warmup_steps", f"must be at most steps ({self.steps}), got {self.warmup_steps}")
        return self


class PretrainParams(TrainParams):
    # gpt2: N(0, 0.02), residual-branch outputs N(0, 0.02 / sqrt(2 n_layers));
    # zero_out: gpt2 with residual-branch outputs and an untied head starting at zero;
    # reference: RyanGPT's (embedding N(0, 1), linear layers Xavier-normal, both cut at 3 sigma)
    init: Literal["gpt2", "zero_out", "reference"]


class CheckpointEveryParams(Section):
    """Steps between two saves of each training stage's resume state (checkpoints/). It changes when progress is
    saved, not what is trained: no stage lists it in dvc.yaml, and a checkpoint's identity leaves it out."""

    pretrain: PositiveInt
    finetune: PositiveInt


class EvaluateParams(Section):
    batch_size: PositiveInt
    eval_batches: PositiveInt
    max_new_tokens: PositiveInt
    temperature: NonNegativeFloat = Field(description="0 is greedy")
    top_k: PositiveInt


class TaskSourcesParams(Section):
    """The data of each task of the suite (model/task_scores.py), keyed by lm-eval's task name: a local folder in
    the layout of the hub dataset the stock task reads, or a hub pin folder (data/hub/...)."""

    blimp: str  # nyu-mll/blimp: one config per paradigm, split train
    lambada_openai: str  # EleutherAI/lambada_openai: config default, split test
    piqa: str  # baber/piqa: split validation
    arc_easy: str  # allenai/ai2_arc: config ARC-Easy, split test
    hellaswag: str  # Rowan/hellaswag: split validation


class TaskScoresParams(Section):
    tasks: TaskSourcesParams
    # items scored per task (per BLiMP paradigm): a seeded sample of those that fit
    limit: NonNegativeInt = Field(description="0 scores every item")
    batch_size: PositiveInt
    device: Device


class Params(Section):
    seed: int
    wikipedia: WikipediaParams
    c4: C4Params
    dialog: DialogParams
    combine: CombineParams
    tokenizer: TokenizerParams
    model: ModelParams
    pretrain: PretrainParams
    finetune: TrainParams
    checkpoint_every: CheckpointEveryParams
    evaluate: EvaluateParams
    task_scores: TaskScoresParams

    @model_validator(mode="after")
    def _checkpoints_on_logged_steps(self):
        # A resumed run restarts its loss average at the checkpoint: only then does it log what an
        # uninterrupted run logs.
        for stage in CheckpointEveryParams.model_fields:
            every, log_every = getattr(self.checkpoint_every, stage), getattr(self, stage).log_every
            if every % log_every:
                raise RuleError(
                    f"checkpoint_every.{stage}", f"must be a multiple of {stage}.log_every ({log_every}), got {every}"
                )
        return self


# --- pydantic's errors as one line each --------------------------------------------------------------

TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "string_too_short": "a non-empty string",
    "model_type": "a mapping of keys",
}
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
BOUND_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _section(path):
    """The model of the section at `path`, a tuple of keys from the top of params.yaml."""
    model = Params
    for name in path:
        model = model.model_fields[name].annotation
    return model


def _key(path):
    return ".".join(map(str, path)) or "(top level)"


def _bounds(field):
    """A field's constraints in words, e.g. '>= 0 and < 1' (with the reason, when the field gives one)."""
    bounds = " and ".join(
        f"{sign} {getattr(constraint, name)}"
        for constraint in field.metadata
        for name, sign in BOUND_SIGNS.items()
        if hasattr(constraint, name)
    )
    return f"{bounds} ({field.description})" if field.description else bounds


def _message(error):
    """One of pydantic's errors as a line that names the key and what would be valid there."""
    path, kind, value = error["loc"], error["type"], error["input"]
    key = _key(path)
    if kind == "extra_forbidden":
        valid = ", ".join(_section(path[:-1]).model_fields)
        return f"{key} is not a known key; valid keys of {_key(path[:-1])}: {valid}"
    if kind == "missing":
        return f"{key} is missing"
    if kind == "value_error" and isinstance(error["ctx"]["error"], RuleError):
        rule = error["ctx"]["error"]
        return f"{_key((*path, rule.key))} {rule.message}"
    if kind in TYPE_NAMES:
        return f"{key} must be {TYPE_NAMES[kind]}, got {value!r}"
    if kind == "literal_error":
        choices = get_args(_section(path[:-1]).model_fields[path[-1]].annotation)
        return f"{key} must be one of {', '.join(choices)}, got {value!r}"
    if kind in BOUND_ERRORS:
        return f"{key} must be {_bounds(_section(path[:-1]).model_fields[path[-1]])}, got {value!r}"
    return f"{key}: {error['msg']}"


def parse_params(raw):
    """Validates a params mapping (as read from YAML) into `Params`, or raises ParamsError naming the first
    thing wrong; an unknown key comes first, since a misspelt key is also a missing one."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        first = min(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ParamsError(f"params.yaml: {_message(first)}") from None


def load_params(path=PARAMS_FILE):
    return parse_params(YAML(typ="safe").load(Path(path)))
