"""Runs inside the vLLM venv (scripts/serving_env.sh), started by engine_check.py as a subprocess:

    .venv-vllm/bin/python moetrain/export/vllm_check.py REQUEST.json RESULT.json

REQUEST: {"model": HF_DIR, "prompts": [[ids...], ...], "max_tokens": N, "max_model_len": L}
RESULT:  {"vllm_version", "torch_version", "transformers_version",
          "results": [{"prompt_logprobs": [lp(token 1 | 0), ...], "tokens": [...], "logprobs": [...]}]}

Standalone on purpose: that venv has vLLM's torch/transformers and no moetrain.
"""
import json
import os
import sys


def _engine(model: str, max_model_len: int):
    import vllm
    kw = dict(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=0,
              enable_prefix_caching=False,  # every prompt computed in full, nothing reused across prompts
              trust_remote_code=False, max_num_seqs=8)
    try:  # a CPU build; the argument is unknown on some builds, where the env var below decides
        return vllm.LLM(device="cpu", **kw)
    except TypeError:
        return vllm.LLM(**kw)


def _chosen_logprob(entry, token: int) -> float:
    """vLLM gives {token_id: Logprob} per position; the chosen token is always in it."""
    return float(entry[token].logprob)


def run(req: dict) -> dict:
    import torch
    import transformers
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(req["model"], int(req["max_model_len"]))
    params = SamplingParams(temperature=0.0, max_tokens=int(req["max_tokens"]), ignore_eos=True, logprobs=0,
                            prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
    results = []
    for prompt, out in zip(req["prompts"], outs):
        plp = [_chosen_logprob(e, t) for e, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        gen = out.outputs[0]
        toks = list(gen.token_ids)
        results.append({"prompt_logprobs": plp, "tokens": toks,
                        "logprobs": [_chosen_logprob(e, t) for e, t in zip(gen.logprobs, toks)]})
    return {"vllm_version": vllm.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "results": results}


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is far more than tiny exports need
    with open(sys.argv[1]) as f:
        request = json.load(f)
    result = run(request)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
