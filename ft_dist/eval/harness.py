"""Benchmarks through EleutherAI's lm-evaluation-harness (`pip install lm_eval`).

Named standard tasks (arc_easy, hellaswag, mmlu, truthfulqa_mc2, ...) run as lm-eval defines them; they download
their data from the Hugging Face hub, so they need hub access or a warm datasets cache. Local multiple-choice items
({question, choices, answer} JSONL) become an lm-eval task file with the same prompt as the native scorer
(`multiple_choice.py`), so both score the same strings. The numbers returned are the harness's own, unrounded.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import yaml

from ft_dist.errors import UserError
from ft_dist.eval.multiple_choice import CONTEXT_TEMPLATE, TARGET_DELIMITER, load_items

LOCAL_TASK_NAME = "ft_dist_mc"
"""Task name of a local item file unless another is given."""


class TaskDataUnreachable(UserError):
    """A named task's data lives on the hub, and neither the hub nor a cached copy can be reached."""


def harness_available() -> bool:
    """Whether lm-eval is importable (else use `multiple_choice.score_multiple_choice`)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def task_config(task_name: str, data_file: Path) -> Dict[str, Any]:
    """An lm-eval multiple-choice task over a local JSONL of {question, choices, answer: index}."""
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # The native scorer's template in Jinja: the same context string reaches the model in both.
        "doc_to_text": CONTEXT_TEMPLATE.replace("{question}", "{{question}}"),
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [
            {"metric": name, "aggregation": "mean", "higher_is_better": True} for name in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }


def write_task(items_path: Union[str, Path], task_dir: Union[str, Path], task_name: str = LOCAL_TASK_NAME) -> Path:
    """Write `<task_dir>/<task_name>.yaml` and its data file from a {question, choices, answer} JSONL.

    The items are validated and rewritten with the answer as an index (the source may give the choice text), so
    lm-eval never has to guess whether "2" is a choice or an index. Returns the YAML path; the directory can be
    given to `lm_eval --include_path` as it is.
    """
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / f"{task_name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for item in load_items(items_path):
            f.write(json.dumps({"question": item.question, "choices": list(item.choices), "answer": item.answer}))
            f.write("\n")
    yaml_path = task_dir / f"{task_name}.yaml"
    yaml_path.write_text(yaml.safe_dump(task_config(task_name, data_file), sort_keys=False), encoding="utf-8")
    return yaml_path


def _metric_name(key: str) -> str:
    # lm-eval keys results as "<metric>,<filter>"; the default filter "none" adds nothing worth showing.
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def harness_metrics(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """lm-eval's `results["results"]` as {task: {metric: value, metric_stderr: value, n: count}}.

    Values are copied, not recomputed; a stderr lm-eval did not compute ("N/A") becomes None.
    """
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for task, entry in results.items():
        metrics: Dict[str, Optional[float]] = {}
        for key, value in entry.items():
            if key in ("name", "alias", "sample_len"):
                continue
            metrics[_metric_name(key)] = value if isinstance(value, (int, float)) else None
        if "sample_len" in entry:
            metrics["n"] = entry["sample_len"]
        out[task] = metrics
    return out


@lru_cache(maxsize=1)
def _builtin_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _task_manager(include_path: Optional[str], include_defaults: bool):
    """lm-eval's task index: built-in tasks, the local task directory, or both.

    Indexing the ~15k built-in task files takes seconds, so it is skipped when only a local task runs, and the
    built-in index alone is built once per process (repeated in-training evaluations reuse it).
    """
    from lm_eval.tasks import TaskManager

    if include_path is None and include_defaults:
        return _builtin_task_manager()
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _check_task_names(task_manager, names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in task_manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval has no task {', '.join(unknown)}; `lm_eval ls tasks` lists them")


def _build_lm(model, tokenizer, batch_size: int, device: Optional[str], peft: Optional[str]):
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, Path)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, device=device, peft=peft)
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer")
    # A model object runs where it already is; lm-eval ignores `device` for it.
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_harness(
    model: Union[str, Path, Any],
    tasks: Sequence[str] = (),
    items_path: Optional[Union[str, Path]] = None,
    *,
    task_dir: Optional[Union[str, Path]] = None,
    task_name: str = LOCAL_TASK_NAME,
    tokenizer: Any = None,
    peft: Optional[str] = None,
    batch_size: int = 8,
    device: Optional[str] = None,
    limit: Optional[Union[int, float]] = None,
    num_fewshot: Optional[int] = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> Dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on named `tasks` and/or local multiple-choice items.

    model: a local HF model directory (its tokenizer saved beside it, or give `tokenizer`), or a loaded
      `PreTrainedModel` with `tokenizer` (in-training use; lm-eval may set the tokenizer's pad token).
    tasks: lm-eval task or group names; unknown names raise UserError, and so does data that cannot be reached.
    items_path: a {question, choices, answer} JSONL, written as task `task_name` into `task_dir` (required with it).
    peft: a LoRA adapter directory to load on top of a model directory.
    bootstrap_iters: lm-eval's stderr setting; accuracies use its closed form, 0 turns stderrs off.

    Returns {"metrics": {task: {metric: value, <metric>_stderr: value, n: count}}, "results": lm-eval's results
    dict, "samples": its per-item records when `log_samples`}.
    """
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise UserError(
            "lm-eval is not installed: pip install lm_eval (or use the native multiple-choice scorer)"
        ) from None
    names: List[str] = list(tasks)
    include_path = None
    if items_path is not None:
        if task_dir is None:
            raise ValueError("items_path needs a task_dir to write the task file into")
        write_task(items_path, task_dir, task_name)
        include_path, names = str(task_dir), names + [task_name]
    if not names:
        raise ValueError("nothing to evaluate: give task names or an items file")
    task_manager = _task_manager(include_path, include_defaults=bool(tasks))
    _check_task_names(task_manager, names)
    lm = _build_lm(model, tokenizer, batch_size, device, peft)
    # A model handed over mid-training may be in train mode: score without dropout, then hand it back as it was.
    was_training = lm.model.training
    lm.model.eval()
    try:
        output = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
        )
    except ConnectionError as err:
        # datasets raises ConnectionError when a task's data lives on the hub and the hub is out of reach.
        raise TaskDataUnreachable(
            f"lm-eval task data not reachable ({err}); named tasks download from the Hugging Face hub: run with hub "
            "access or a filled HF_DATASETS_CACHE, or pass local items"
        ) from err
    finally:
        lm.model.train(was_training)
    return {
        "metrics": harness_metrics(output["results"]),
        "results": output["results"],
        "samples": output.get("samples", {}) if log_samples else {},
    }
