"""Text generation: prefill the prompt into a KV cache, then decode one token at a time.

Sampling is a few small pure functions (temperature, top-k, top-p), shared by the evaluation
stage and the server.
"""

import torch

from model.gpt import KVCache


NUCLEUS_CANDIDATES = 256  # top-p looks at this many most likely tokens first (a full sort is slow)


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
    """Keeps the smallest set of most likely tokens whose mass reaches top_p (at least one), renormalised."""
    candidates, order = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    if not bool((candidates.sum(dim=-1) >= top_p).all()):  # a flat distribution: the nucleus is wider
        candidates, order = torch.sort(probs, dim=-1, descending=True)
    keep = candidates.cumsum(dim=-1) - candidates < top_p
    kept = torch.zeros_like(probs).scatter(-1, order, candidates * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(probs, generators):
    """One token per row of `probs`, row i drawn with generators[i]: the inverse CDF of one uniform number."""
    cdf = probs.cumsum(dim=-1)
    uniform = torch.stack([torch.rand((), generator=generator) for generator in generators])
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


def sample(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token id per row of (B, vocab) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits.float(), temperature, top_k, top_p)
    return draw(probs, [generator] * probs.shape[0])


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_ids=(), min_new_tokens=0, use_cache=True):
    """New token ids continuing `prompt_ids`; stops after a stop id (included) or at the context end.

    `min_new_tokens` forbids the stop ids before that many tokens. Without the cache every step
    runs the whole sequence again (the slow reference the cache is tested against).
    """
    device = model.rope_cos.device
    context_length = model.config.context_length
    max_new_tokens = min(max_new_tokens, context_length - len(prompt_ids))
    if max_new_tokens <= 0:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {context_length}")
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(model.config, 1, context_length, device, model.rope_cos.dtype) if use_cache else None
    step_input, positions = tokens, torch.arange(tokens.shape[1], device=device)[None]
    new_ids = []
    for _ in range(max_new_tokens):
        if use_cache:
            logits, _ = model(step_input, cache=cache, positions=positions)
        else:
            logits, _ = model(tokens)
        next_logits = logits[:, -1].float()
        if len(new_ids) < min_new_tokens and stop.numel():
            next_logits[:, stop] = float("-inf")
        next_id = sample(next_logits, temperature, top_k, top_p, generator)
        new_ids.append(int(next_id))
        if new_ids[-1] in stop_ids:
            break
        step_input = next_id[:, None]
        positions = positions[:, -1:] + 1
        tokens = torch.cat([tokens, step_input], dim=1)
    return new_ids
