"""Stage export: both trained models as Hugging Face Llama folders under serve/models/.

usage: python -m stages.export PRETRAINED_DIR FINETUNED_DIR TOKENIZER_MODEL TOKENS_DIR EVALUATE_JSON OUT_DIR
"""

import json
from pathlib import Path

from model.errors import run_stage
from model.export import export_model
from model.gpt import load_model
from model.params import load_params
from model.token_arrays import load_meta

# Served name -> (training stage, chat model?)
EXPORTS = {"base": ("pretrain", False), "chat": ("finetune", True)}


def main(pretrained_dir, finetuned_dir, tokenizer_model, token_dir, evaluate_json, out_dir):
    params = load_params()
    model_dirs = {"pretrain": pretrained_dir, "finetune": finetuned_dir}
    evaluation = json.loads(Path(evaluate_json).read_text(encoding="utf-8"))
    splits = load_meta(token_dir)["splits"]
    generation = {"temperature": params.evaluate.temperature, "top_k": params.evaluate.top_k}
    for name, (stage, chat) in EXPORTS.items():
        train = getattr(params, stage)
        model = load_model(model_dirs[stage])
        summary = {
            "training": {
                "stage": stage,
                "optimizer": train.optimizer,
                "schedule": train.schedule,
                "steps": train.steps,
                "tokens_per_step": train.batch_size * train.grad_accum * model.config.context_length,
                "lr": train.lr,
                "min_lr": train.min_lr,
                "seed": params.seed,
            },
            "data": {
                "train_tokens": splits["dialog_train" if chat else "train"]["tokens"],
                "train_documents": splits["dialog_train" if chat else "train"]["documents"],
                "vocab_size": model.config.vocab_size,
            },
            "metrics": evaluation[name],
        }
        export_model(model, tokenizer_model, Path(out_dir) / name, name, chat, summary, generation)


if __name__ == "__main__":
    run_stage(main)
