"""Stage evaluate: both models on every held-out split, and completions of fixed prompts.

usage: python -m stages.evaluate TOKENS_DIR TOKENIZER_MODEL PRETRAINED_DIR FINETUNED_DIR METRICS_JSON COMPLETIONS_MD
"""

from model.completions import completions
from model.errors import run_stage
from model.evaluation import dialog_evaluator, heldout_evaluator
from model.files import atomic_output, write_json
from model.gpt import load_model
from model.params import load_params
from model.token_arrays import check_same_vocabulary
from model.tokenizer import Tokenizer


def main(token_dir, tokenizer_model, pretrained_dir, finetuned_dir, metrics_path, completions_path):
    params = load_params()
    tokenizer = Tokenizer(tokenizer_model)
    metrics, report = (
        {},
        [
            "# Completions of fixed prompts",
            "",
            f"seed {params.seed}, temperature {params.evaluate.temperature}, "
            f"top-k {params.evaluate.top_k}, at most {params.evaluate.max_new_tokens} tokens",
            "",
        ],
    )
    # Keyed by the served names (base: pretrained, chat: finetuned), short enough for `dvc exp show`.
    for name, model_dir, chat in (("base", pretrained_dir, False), ("chat", finetuned_dir, True)):
        model = load_model(model_dir)
        check_same_vocabulary(tokenizer.vocab_size, tokenizer_model, model.config, model_dir)
        sizes = (model.config.context_length, params.evaluate.batch_size, params.evaluate.eval_batches)
        metrics[name] = {
            **heldout_evaluator(token_dir, *sizes)(model),
            **dialog_evaluator(token_dir, "validation", *sizes)(model),
        }
        report += [f"## {name}", ""]
        for prompt, completion in completions(model, tokenizer, chat, params.evaluate, params.seed):
            report += [f"- **{prompt}** {completion.strip()!r}"]
        report.append("")
    write_json(metrics_path, metrics)
    with atomic_output(completions_path) as tmp:
        tmp.write_text("\n".join(report), encoding="utf-8")


if __name__ == "__main__":
    run_stage(main)
