"""Zero-shot task accuracy of a checkpoint folder through EleutherAI's lm-evaluation-harness.

lm_eval is optional (the `eval` extra) and imported only when a task is run.
"""

from __future__ import annotations

from pathlib import Path

from loraprune.errors import LoraPruneError
from loraprune.models.loading import is_decilm_folder, resolve_model_dir

INSTALL_HINT = "pip install 'loraprune[eval]'"


def run_tasks(model_dir: Path | str, tasks: list[str], limit: int | None = None, batch_size: int = 1,
              include_path: Path | None = None, dtype: str = "float32") -> dict:
    """Run lm-eval tasks on a model (folder, .gguf or built-in name); returns metrics per task."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LoraPruneError(f"zero-shot tasks need lm-evaluation-harness; {INSTALL_HINT}") from e
    model_dir = resolve_model_dir(str(model_dir))
    if not tasks:
        raise LoraPruneError("no tasks given; pass e.g. --tasks boolq,piqa")
    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise LoraPruneError(f"unknown lm-eval task(s) {', '.join(unknown)}; "
                             "`lm-eval ls tasks` lists the available ones")
    # Our per-layer folders run on the modeling code they ship (see export/modeling_decilm.py).
    remote_code = ",trust_remote_code=True" if is_decilm_folder(model_dir) else ""
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype={dtype}{remote_code}", tasks=list(tasks),
            limit=limit, batch_size=batch_size, device="cpu", task_manager=task_manager,
            log_samples=False, bootstrap_iters=0)
    except (ConnectionError, OSError) as e:
        raise LoraPruneError(f"lm-eval could not load a task's data ({e}); these tasks download "
                             "their data sets from the Hugging Face hub, so run with network") from e
    return {
        "model": str(model_dir),
        "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "tasks": {task: _plain_metrics(metrics) for task, metrics in results["results"].items()},
        "samples": {task: n.get("effective") for task, n in results.get("n-samples", {}).items()},
    }


def format_results(result: dict) -> str:
    """One line per task with its metrics."""
    lines = []
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        samples = result["samples"].get(task)
        lines.append(f"{task}: {shown}" + (f" ({samples} examples)" if samples else ""))
    return "\n".join(lines)


def _plain_metrics(metrics: dict) -> dict[str, float]:
    """lm-eval's 'acc,none' keys as 'acc'; bookkeeping (alias, sample_len) and stderr dropped."""
    plain = {}
    for key, value in metrics.items():
        name, comma, _filter = key.partition(",")  # metrics are 'name,filter'; bookkeeping has no comma
        if comma and isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
            plain[name] = float(value)
    return plain
