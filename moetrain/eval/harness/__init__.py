"""lm-evaluation-harness tasks over our own evaluation data (scripts/eval_harness.py).

    moetrain_heldout_ppl.yaml  held-out perplexity on our eval windows (loglikelihood of
                               tokens 1..S given token 0, token-level NLL = our eval loss)
    moetrain_passkey.yaml      our passkey grid's trials, generate_until, greedy, exact match
    utils.py                   the tasks' functions (stdlib + lm_eval: also runs in the vLLM venv)
    rows.py                    the JSONL rows, each checked to tokenise back to our ids
    compare.py                 our numbers on the same rows, the harness's, and their agreement
    backends.py, runner.py     the HF backend in-process, the vLLM backend in its own venv

lm_eval itself is an optional dependency (`pip install -e '.[eval]'`, also in [dev]).
"""
from moetrain.eval.harness.compare import PPL_TOL
from moetrain.eval.harness.rows import PASSKEY_TASK, PPL_TASK, write_task_folder

__all__ = ["PPL_TOL", "PPL_TASK", "PASSKEY_TASK", "write_task_folder"]
