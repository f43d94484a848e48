"""Running the harness on an export: the HF backend in this process, the vLLM backend as a
subprocess in the vLLM venv (scripts/serving_env.sh --with-lm-eval; vLLM pins its own torch
and transformers). Both run two passes over the same model folder: the perplexity rows with
add_bos_token=False (windows from inside a document have no <s>) and the passkey rows with
add_bos_token=True (our prompts start with <s>): the harness has one such setting per model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from moetrain.eval.harness.rows import PASSKEY_TASK, PPL_TASK

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
VENV_ENV = "MOETRAIN_VLLM_VENV"  # as moetrain.export.engine_check: where the vLLM venv is
BACKENDS = ("hf", "vllm")
VLLM_EXTRA = 2  # positions past the longest row that vLLM needs (see model_args)
# vLLM sizes its RoPE tables by max_position_embeddings; a row whose positions pass it reads past
# the table (a NaN window was seen with VLLM_ALLOW_LONG_MAX_MODEL_LEN), so rows stop VLLM_EXTRA short.
LM_EVAL_PIN = "lm-eval>=0.4.9,<0.5"
MISSING_LM_EVAL = (f"error: Python package 'lm_eval' is missing; install it with `pip install -e '.[eval]'` "
                   f"(or `pip install '{LM_EVAL_PIN}'`)")


class HarnessFailed(RuntimeError):
    """The harness subprocess (vLLM backend) failed; its stderr tail is the message."""


def vllm_venv() -> str:
    return os.environ.get(VENV_ENV) or os.path.join(ROOT, ".venv-vllm")


def model_args(backend: str, model_dir: str, max_len: int, add_bos: bool, device: str = "cpu") -> dict:
    """lm_eval model_args: fp32 (as our eval), the longest row fits (no truncation)."""
    args = {"pretrained": os.path.abspath(model_dir), "dtype": "float32", "add_bos_token": add_bos}
    if backend == "hf":
        return {**args, "max_length": int(max_len), "device": device}
    # lm-eval's vLLM backend keeps one position for a generated token and a row is S + 1 tokens: S + 2.
    # Every prompt computed in full, nothing reused across prompts (as the export's engine check).
    return {**args, "max_model_len": int(max_len) + VLLM_EXTRA, "enforce_eager": True,
            "enable_prefix_caching": False, "seed": 0}


def vllm_longest(trained_len: int) -> int:
    """The longest row (tokens) the vLLM backend evaluates for an export of this max_position_embeddings."""
    return trained_len - VLLM_EXTRA


def fit_lengths(lengths: list, backends: list, trained_len: int) -> tuple[list, list]:
    """(lengths, notes): default lengths shortened to vllm_longest when the vLLM backend runs (every
    backend then scores the same windows and trials)."""
    if "vllm" not in backends or trained_len <= 0:
        return lengths, []
    cap = vllm_longest(trained_len)
    out = sorted({min(L, cap) for L in lengths})
    notes = [f"length {L} evaluated at {cap} tokens: lm-eval's vLLM backend needs {VLLM_EXTRA} positions past a "
             f"row and the export's max_position_embeddings is {trained_len}" for L in lengths if L > cap]
    return out, notes


def request(backend: str, model_dir: str, tasks_dir: str, max_len: int, n_rows: dict, batch_size: int,
            device: str = "cpu") -> dict:
    """The runner's request: one pass per task that has rows."""
    runs = [{"tasks": [task], "model_args": model_args(backend, model_dir, max_len, add_bos, device)}
            for task, add_bos in ((PPL_TASK, False), (PASSKEY_TASK, True)) if n_rows.get(task)]
    return {"model": backend, "runs": runs, "tasks_dir": os.path.abspath(tasks_dir),
            "batch_size": batch_size if backend == "hf" else "auto"}


def check_backend(backend: str, max_len: int = 0, trained_len: int = 0) -> None:
    """Fail before the slow work when the backend cannot run here (one line naming the fix)."""
    if backend == "hf":
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(MISSING_LM_EVAL[len("error: "):]) from None
        return
    if trained_len > 0 and max_len > vllm_longest(trained_len):
        raise ValueError(f"the vLLM backend cannot evaluate {max_len} tokens: the export's max_position_embeddings "
                         f"is {trained_len} and lm-eval's vLLM backend needs {VLLM_EXTRA} positions past a row; use "
                         f"--lengths up to {vllm_longest(trained_len)} (the HF backend takes longer ones)")
    py = os.path.join(vllm_venv(), "bin", "python")
    if not os.path.isfile(py):
        raise ValueError(f"the vLLM backend needs the vLLM venv {vllm_venv()}, which does not exist; create it "
                         f"with `bash scripts/serving_env.sh --with-lm-eval` (or set {VENV_ENV})")
    if subprocess.run([py, "-c", "import lm_eval, vllm"], capture_output=True).returncode != 0:
        raise ValueError(f"the vLLM venv {vllm_venv()} lacks lm_eval or vllm; run "
                         "`bash scripts/serving_env.sh --with-lm-eval`")


def run(backend: str, req: dict, work_dir: str) -> dict:
    """The runner's result (see runner.py) for one backend."""
    if backend == "hf":
        from moetrain.eval.harness.runner import run as run_here
        return run_here(req)
    path = os.path.join(work_dir, f"harness_{backend}_request.json")
    out = os.path.join(work_dir, f"harness_{backend}_result.json")
    with open(path, "w") as f:
        json.dump(req, f)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env.pop("PYTHONPATH", None)  # that venv must not pick up this checkout's packages
    p = subprocess.run([os.path.join(vllm_venv(), "bin", "python"), RUNNER, path, out], cwd=work_dir, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0 or not os.path.isfile(out):
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])[-600:]
        raise HarnessFailed(f"lm_eval (vLLM backend) failed with exit code {p.returncode}: {tail}")
    with open(out) as f:
        return json.load(f)


def as_samples(result: dict) -> dict:
    """{task: [sample]} over the result's passes."""
    return {t: s for r in result["runs"] for t, s in r["samples"].items()}
