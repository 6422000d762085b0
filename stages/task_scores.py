"""Stage task_scores: both exports on lm-evaluation-harness's stock tasks (BLiMP, LAMBADA, PIQA, ARC-Easy,
HellaSwag), each task's data read from its source in params.yaml (task_scores.tasks).

usage: python -m stages.task_scores MODELS_DIR METRICS_JSON PLOTS_DIR

Writes METRICS_JSON ({model: {task: figures}}) and PLOTS_DIR/{base,chat}.json (each task's accuracy, for
`dvc plots`), only once every model is scored.
"""

from pathlib import Path

from model.errors import run_stage
from model.files import atomic_output, json_text, write_json
from model.params import load_params
from model.task_scores import check_export, load_scorer, load_suite, plot_rows, score_model

MODELS = ("base", "chat")  # the export stage's folders


def main(models_dir, metrics_path, plots_dir):
    params = load_params()
    settings = params.task_scores
    for name in MODELS:
        check_export(Path(models_dir) / name)
    suite = load_suite(settings.tasks)
    scores = {
        name: score_model(
            load_scorer(Path(models_dir) / name, settings.batch_size, settings.device),
            suite,
            settings.limit,
            params.seed,
        )
        for name in MODELS
    }
    with atomic_output(Path(plots_dir)) as tmp:
        tmp.mkdir()
        for name in MODELS:
            (tmp / f"{name}.json").write_text(json_text(plot_rows(scores[name])), encoding="utf-8")
    write_json(metrics_path, scores)


if __name__ == "__main__":
    run_stage(main)
