"""Text generation: prefill the prompt into a KV cache, then decode one token at a time.

`next_tokens` is the one sampling step, shared by the evaluate stage (`generate`) and the server's
batching engine: each sequence's next token comes from its own row of logits, its own settings and
its own random stream, and never from the other rows of the batch.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from model.gpt import KVCache

NUCLEUS_CANDIDATES = 256  # top-p looks at this many most likely tokens first (a full sort is slow)
# Below this temperature, sampling is greedy decoding in all but name, and logits / temperature would overflow.
GREEDY_BELOW_TEMPERATURE = 1e-6
# A top_p under the top token's probability (never under 1 / vocabulary size) keeps that token alone. Raising
# smaller values to this one changes nothing, and keeps them from rounding to 0 in float32, which drops every token.
MIN_TOP_P = 1e-6


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens: at most `max_tokens`, none of `stop_ids` before `min_tokens`."""

    max_tokens: int
    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_tokens: int = 0
    stop_ids: tuple = ()  # tokens that end the text

    def __post_init__(self):
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "top_p", max(self.top_p, MIN_TOP_P))


def random_stream(seed=None, choice=0):
    """The random numbers one sequence samples with.

    Every bit of a 64-bit seed counts (a negative seed is taken modulo 2**64), and each choice of a
    request with n choices has its own stream, seeded with (seed, choice): choice 0 is the text the
    same request with n = 1 gives. Without a seed, the operating system's entropy.
    """
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, choice]))


@dataclass
class Sequence:
    """A prompt and the tokens generated after it so far."""

    prompt_ids: list
    sampling: Sampling
    stream: np.random.Generator = field(default_factory=random_stream)
    new_ids: list = field(default_factory=list)

    def finished(self, context_length):
        """'stop' after a stop id, 'length' at max_tokens or at the end of the context, else None."""
        if self.new_ids and self.new_ids[-1] in self.sampling.stop_ids:
            return "stop"
        if len(self.new_ids) >= self.sampling.max_tokens or len(self.prompt_ids) + len(self.new_ids) >= context_length:
            return "length"
        return None


def logits_to_probs(logits, temperature, top_k=None, top_p=None):
    """Next-token probabilities (B, vocab) after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = nucleus(probs, top_p)
    return probs


def nucleus(probs, top_p):
    """Keeps the smallest set of most likely tokens whose mass reaches top_p (at least one), renormalised.

    The top NUCLEUS_CANDIDATES tokens of each row hold its nucleus unless the row is flat; only those
    rows are sorted whole. Which way a row goes depends on that row alone.
    """
    candidates, order = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    kept = _keep_nucleus(probs, candidates, order, top_p)
    wide = candidates.sum(dim=-1) < top_p
    if wide.any():
        kept[wide] = _keep_nucleus(probs[wide], *torch.sort(probs[wide], dim=-1, descending=True), top_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def _keep_nucleus(probs, candidates, order, top_p):
    """`probs` with only the leading `candidates` (in `order`) whose mass before them is under top_p."""
    keep = candidates.cumsum(dim=-1) - candidates < top_p
    return torch.zeros_like(probs).scatter(-1, order, candidates * keep)


def draw(probs, streams):
    """One token per row of `probs`, row i drawn with streams[i]: the inverse CDF of one uniform number."""
    cdf = probs.cumsum(dim=-1)
    uniform = torch.tensor([stream.random() for stream in streams], dtype=probs.dtype, device=probs.device)
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


def next_tokens(logits, sequences):
    """The next token id of each sequence, from its row of (B, vocab) logits.

    Rows with the same settings are filtered together (the operations work row by row); each row
    then draws with its sequence's own stream, so a seeded sequence gives the same text however it
    was batched.
    """
    logits = logits.float()
    held_back = [
        row
        for row, sequence in enumerate(sequences)
        if len(sequence.new_ids) < sequence.sampling.min_tokens and sequence.sampling.stop_ids
    ]
    if held_back:
        logits = logits.clone()  # the caller's logits stay as the model gave them
        for row in held_back:
            logits[row, list(sequences[row].sampling.stop_ids)] = float("-inf")
    groups = {}
    for row, sequence in enumerate(sequences):
        sampling = sequence.sampling
        groups.setdefault((sampling.temperature, sampling.top_k, sampling.top_p), []).append(row)
    tokens = [0] * len(sequences)
    for (temperature, top_k, top_p), rows in groups.items():
        group = logits if len(rows) == len(sequences) else logits[rows]  # (indexing costs ~0.1 ms a step)
        if temperature == 0:
            chosen = group.cpu().numpy().argmax(axis=-1)  # numpy's: a quarter of torch's time on one row
        else:
            probs = logits_to_probs(group, temperature, top_k, top_p)
            chosen = draw(probs, [sequences[row].stream for row in rows])
        for row, token in zip(rows, chosen.tolist()):
            tokens[row] = token
    return tokens


@torch.no_grad()
def generate(model, prompt_ids, sampling, seed=None):
    """New token ids continuing `prompt_ids`; ends after a stop id (included), at max_tokens or at the
    end of the context."""
    context_length = model.config.context_length
    if not 0 < len(prompt_ids) < context_length:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {context_length}")
    device = model.rope_cos.device
    sequence = Sequence(list(prompt_ids), sampling, random_stream(seed))
    cache = KVCache(model.config, 1, context_length, device, model.rope_cos.dtype)
    rows = torch.zeros(1, dtype=torch.long, device=device)
    tokens = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    while True:
        logits, _ = model(tokens, cache=cache, rows=rows, positions=positions)
        sequence.new_ids += next_tokens(logits[:, -1], [sequence])
        if sequence.finished(context_length):
            return sequence.new_ids
        tokens = torch.tensor([sequence.new_ids[-1:]], device=device)
        positions = positions[:, -1:] + 1
