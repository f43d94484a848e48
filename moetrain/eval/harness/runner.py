"""Run our harness tasks with lm-evaluation-harness and keep the per-row results.

In-process for the HF backend (main venv); as a script in the vLLM venv for the vLLM
backend (vLLM pins its own torch and transformers, scripts/serving_env.sh):

    VENV/bin/python moetrain/eval/harness/runner.py REQUEST.json RESULT.json

REQUEST: {"model": "hf" | "vllm", "runs": [{"tasks": [...], "model_args": {...}}], "tasks_dir": DIR,
          "batch_size": N}
RESULT:  {"lm_eval_version", "runs": [{"results": {task: {metric: value}},
          "samples": {task: [{"doc_id", "doc", "response"}]}}]}

Standalone on purpose (stdlib + lm_eval only): that venv has no moetrain.
"""
import json
import os
import sys


def _response(sample: dict):
    """log-likelihood (loglikelihood rows) or the generated text (generate_until rows)."""
    resp = sample["filtered_resps"][0]
    return float(resp[0]) if isinstance(resp, (list, tuple)) else resp


def run_tasks(model: str, model_args: dict, tasks_dir: str, tasks: list, batch_size=1) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=tasks_dir, include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=tm,
                                  batch_size=batch_size, log_samples=True, bootstrap_iters=0,
                                  apply_chat_template=False, num_fewshot=0)
    results = {t: {k.split(",")[0]: v for k, v in out["results"][t].items()
                   if "," in k and not k.split(",")[0].endswith("_stderr")} for t in tasks}
    samples = {t: [{"doc_id": s["doc_id"], "doc": s["doc"], "response": _response(s)}
                   for s in out["samples"][t]] for t in tasks}
    return {"results": results, "samples": samples}


def run(req: dict) -> dict:
    import lm_eval
    runs = [run_tasks(req["model"], r["model_args"], req["tasks_dir"], r["tasks"], req.get("batch_size", 1))
            for r in req["runs"]]
    return {"lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "runs": runs}


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is far more than tiny exports need
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: faster on few cores
    with open(sys.argv[1]) as f:
        request = json.load(f)
    result = run(request)
    with open(sys.argv[2] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
