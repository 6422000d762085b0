"""Completions of fixed prompts, the evaluate stage's look at what each model writes."""

import torch

from model.generate import Sampling, generate

BASE_PROMPTS = ("Albert Einstein was born in", "The capital of France is", "The Roman Empire was")
CHAT_PROMPTS = ("Hello", "How are you?", "What is your name?")


@torch.no_grad()
def completions(model, tokenizer, chat, params, seed):
    """[(prompt, completion)] for the fixed prompts: base prompts continue a document, chat prompts
    get the assistant's reply."""
    results = []
    for prompt in CHAT_PROMPTS if chat else BASE_PROMPTS:
        prompt_ids = tokenizer.chat_prompt([prompt]) if chat else tokenizer.document_prompt(prompt)
        stop_ids = tokenizer.reply_end_ids if chat else tokenizer.document_end_ids
        sampling = Sampling(params.max_new_tokens, params.temperature, params.top_k, stop_ids=tuple(stop_ids))
        new_ids = generate(model, prompt_ids, sampling, seed)
        # The stop token that ended the text (<|endoftext|>, a newline, <|user|>) is not part of it.
        results.append((prompt, tokenizer.decode([i for i in new_ids if i not in stop_ids])))
    return results
