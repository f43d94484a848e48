"""`--verify-engine vllm`: does a serving engine compute what our model computes?

Our model (main venv) and vLLM (its own venv, scripts/serving_env.sh; started as a
subprocess running vllm_check.py) see the same prompts, spread in length up to the
trained context, so they cross the sliding windows and the RoPE original maximum.
Compared: the log-probability of every prompt token (teacher forcing; this locates a
difference to one position) and greedy continuations (vLLM through its KV cache, ours by
full recomputation). Greedy may part at a near-tie, which is not a failure.

Prompts: N_PROMPTS lengths from a quarter of the trained context to all of it, less the
GEN_TOKENS continuation (default config: 256..1008 + 16 = 1024). check_supported() refuses,
in one line, what vLLM 0.32 serves as another model. run_vllm_jobs() checks several
exports in one vLLM process (tests/export/test_vllm_matrix.py).

Legend: P prompts, L prompt length, G generated tokens, V vocabulary.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from moetrain.export.targets import ExportError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_ENV = "MOETRAIN_VLLM_VENV"  # where the vLLM venv is, if not ROOT/.venv-vllm
ENGINES = ("vllm",)
MAX_DLOGPROB = {"fp32": 1e-3, "bf16": 5e-2}  # |log p_ours - log p_engine|: fp32 kernels differ ~1e-5
N_PROMPTS, GEN_TOKENS, MIN_PROMPT = 8, 16, 16
REQUIRE_ENV = "MOETRAIN_REQUIRE_VLLM"  # "1" (CI): tests fail instead of skipping without the vLLM venv


class EngineFailed(RuntimeError):
    """The engine could not load or run the export (its own error, one line)."""


def engine_python(engine: str) -> str:
    """The interpreter of the engine's venv; one line naming the fix when it is missing."""
    if engine not in ENGINES:
        raise ValueError(f"--verify-engine '{engine}' is not supported; supported: {', '.join(ENGINES)}")
    venv = os.environ.get(VENV_ENV) or os.path.join(ROOT, ".venv-vllm")
    py = os.path.join(venv, "bin", "python")
    if not os.path.isfile(py):
        raise ValueError(f"--verify-engine vllm needs the vLLM venv {venv}, which does not exist; create it with "
                         f"`bash scripts/serving_env.sh` (or point {VENV_ENV} at one)")
    return py


def check_supported(rope, plan, mcfg) -> None:
    """Refuse what vLLM 0.32 serves as another model by construction (README, "Export and
    serving"), found by this check's prompt log-probabilities and then in vLLM's source.
    `rope` is the model's RopeScaling strategy (model.rotary.rope)."""
    from moetrain.export.verify import LENGTH_DEPENDENT_ROPE
    if rope.name in LENGTH_DEPENDENT_ROPE:
        raise ExportError(f"--verify-engine vllm with {rope.name} RoPE: vLLM fixes its frequencies for the longest "
                          "context and keeps cached keys, while the model picks them from the current length; "
                          "the two differ by design, so there is nothing exact to check (drop --verify-engine)")
    if rope.name == "yarn" and rope.original_max * rope.factor < rope.max_position_embeddings:
        # vLLM's YaRN tables hold original x factor positions, whatever max_position_embeddings says
        raise ExportError(f"--verify-engine vllm with YaRN factor {rope.factor:g} x original context "
                          f"{rope.original_max} < trained context {rope.max_position_embeddings}: vLLM's YaRN "
                          "has no rotation for the positions beyond; set the stage's rope.factor >= "
                          f"{rope.max_position_embeddings / rope.original_max:g}")
    if len(set(plan.layer_kinds)) > 1:
        # vLLM sets its one model-wide window only when every layer_types entry is sliding, and
        # its Mixtral/Qwen2-MoE/Qwen3-MoE pass no per-layer window: every layer attends in full.
        raise ExportError("--verify-engine vllm with a per-layer sliding/full attention mix: vLLM 0.32's "
                          "Qwen2-MoE ignores layer_types and attends in full on every layer, so it serves another "
                          "model; train with one attention pattern for all layers to serve with vLLM")
    head_dim = mcfg.head_dim or mcfg.hidden_size // mcfg.n_heads
    if plan.arch == "qwen2_moe" and head_dim * mcfg.n_heads != mcfg.hidden_size:
        raise ExportError(f"--verify-engine vllm with model.head_dim={head_dim} != hidden_size / n_heads: vLLM's "
                          "Qwen2-MoE ignores head_dim in config.json, so it cannot load this export")


def prompt_lengths(max_len: int, n: int = N_PROMPTS, gen: int = GEN_TOKENS) -> list:
    """n lengths from a quarter of the context to the whole of it (less the continuation)."""
    top = max_len - gen
    first = min(max(MIN_PROMPT, max_len // 4), top)
    return sorted({round(first + (top - first) * k / max(n - 1, 1)) for k in range(n)})


def engine_prompts(lengths: list, vocab_size: int, data_dir=None, seed: int = 0) -> list:
    """Token-id prompts: windows of the run's eval text when its prepared folder is at hand
    (real text: greedy continuations rarely tie), else seeded random tokens."""
    stream = _eval_tokens(data_dir, max(lengths)) if data_dir else None
    import numpy as np  # here, not at import: `import moetrain.export` must not need it (deps.py's one line)
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        if stream is not None:
            start = int(rng.integers(0, len(stream) - n + 1))
            out.append([int(t) for t in stream[start:start + n]])
        else:
            out.append([int(t) for t in rng.integers(4, vocab_size, n)])
    return out


def _eval_tokens(data_dir: str, need: int):
    """The longest eval document of a prepared folder when it holds `need` tokens, else the eval
    documents one after another (as packed training sees them); None without enough eval text."""
    import numpy as np
    try:
        from moetrain.data.shards import SplitData
        split = SplitData(data_dir, "eval", verify_hashes=False)
    except Exception:  # noqa: BLE001 - no usable data folder: random prompts are the documented fallback
        return None
    if not len(split.docs):
        return None
    doc = int(np.argmax(split.lengths))
    n = int(split.lengths[doc])
    if n >= need:
        return split.tokens(doc, 0, n)
    if int(np.sum(split.lengths)) < need:
        return None
    return np.concatenate([split.tokens(d, 0, int(split.lengths[d])) for d in range(len(split.docs))])


@torch.no_grad()
def reference(model, prompts: list, gen: int = GEN_TOKENS) -> list:
    """Per prompt: log p of each prompt token given its prefix [L-1], greedy tokens [G], and
    our log-softmax at each greedy step [G, V] (to tell a near-tie from a real difference)."""
    out = []
    for p in prompts:
        seq = torch.tensor([p])
        logp = model(seq).logits[0].double().log_softmax(-1)  # [L, V]
        prompt_lp = logp[:-1].gather(1, seq[0, 1:, None])[:, 0]
        steps, toks = [logp[-1]], []
        for _ in range(gen):
            toks.append(int(steps[-1].argmax()))
            if len(toks) == gen:
                break
            seq = torch.cat([seq, torch.tensor([[toks[-1]]])], dim=1)
            steps.append(model(seq).logits[0, -1].double().log_softmax(-1))
        out.append({"prompt_logprobs": prompt_lp.tolist(), "tokens": toks, "step_logprobs": torch.stack(steps)})
    return out


def _error_line(stderr: str) -> str:
    """The most specific error line of vLLM's output: its last `...Error: ...` line that is not
    the engine core's generic wrapper, else the last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception): ", ln)
              and "Engine core initialization failed" not in ln]
    return (errors or lines or ["no output"])[-1]


def run_vllm_jobs(jobs: list, python: str, timeout: Optional[int] = None) -> tuple:
    """One vllm_check.py process for several exports (one vLLM import). `jobs`: dicts with
    model (folder), prompts, max_tokens, max_model_len. Returns (versions, [results per job])."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_check.py")
    timeout = timeout or 600 + 600 * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        req, res = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(req, "w") as f:
            json.dump({"jobs": [{**j, "model": os.path.abspath(j["model"])} for j in jobs]}, f)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        try:
            proc = subprocess.run([python, script, req, res], capture_output=True, text=True, timeout=timeout,
                                  env=env, cwd=tmp)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, err = "timeout", f"TimeoutError: no result after {timeout} s\n"
        done = []
        if os.path.isfile(res):
            with open(res) as f:
                result = json.load(f)
            done = result["jobs"]
        if code != 0 or len(done) != len(jobs):
            model = jobs[len(done)]["model"] if len(done) < len(jobs) else "?"
            raise EngineFailed(f"vLLM could not run the export {model} (exit {code}): {_error_line(err or '')}")
    versions = {k: v for k, v in result.items() if k.endswith("_version")}
    return versions, [j["results"] for j in done]


def run_vllm(hf_dir: str, prompts: list, gen: int, max_model_len: int, python: str) -> dict:
    """One export: {**versions, "results": [per prompt]} (the form compare() reads)."""
    versions, (results,) = run_vllm_jobs([{"model": hf_dir, "prompts": prompts, "max_tokens": gen,
                                           "max_model_len": max_model_len}], python)
    return {**versions, "results": results}


@dataclass
class EngineComparison:
    engine: str
    versions: dict
    tolerance: float
    max_dlogprob: float
    prompt_lengths: list
    greedy_identical: int                        # prompts whose G tokens all agree
    greedy_tokens_agreeing: int                  # over all prompts, the common prefix lengths
    greedy_tokens_total: int
    first_divergence: dict = field(default_factory=dict)  # prompt, length, position, dlogprob (empty: none)
    real_greedy_split: bool = False              # a greedy difference that is no near-tie

    @property
    def passed(self) -> bool:
        return self.max_dlogprob <= self.tolerance and not self.real_greedy_split

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        d = self.first_divergence
        where = (f"; first divergence: prompt {d['prompt']} ({d['length']} tokens) at position {d['position']} "
                 f"(|dlogprob| {d['dlogprob']:.3g})" if d else "")
        return (f"{self.engine} {self.versions.get('vllm_version', '?')}: max |dlogprob| {self.max_dlogprob:.3e} "
                f"(<= {self.tolerance:g}) over {len(self.prompt_lengths)} prompts of {min(self.prompt_lengths)}-"
                f"{max(self.prompt_lengths)} tokens; greedy identical on {self.greedy_identical}/"
                f"{len(self.prompt_lengths)} prompts ({self.greedy_tokens_agreeing}/{self.greedy_tokens_total} "
                f"tokens){where}")


def _prompt_divergence(ours: list, theirs: list, tol: float):
    """(max |dlogprob| over all prompt positions, first (prompt, position, d) above tol or None)."""
    import numpy as np
    worst, first = 0.0, None
    for i, (a, b) in enumerate(zip(ours, theirs)):
        d = np.abs(np.asarray(a["prompt_logprobs"]) - np.asarray(b["prompt_logprobs"]))
        d = np.where(np.isfinite(d), d, np.inf)
        worst = max(worst, float(d.max()))
        above = np.flatnonzero(d > tol)
        if first is None and above.size:
            first = (i, int(above[0]) + 1, float(d[above[0]]))  # +1: entry k is the logprob of token k+1
    return worst, first


def compare(ours: list, theirs: dict, prompts: list, tol: float, engine: str = "vllm") -> EngineComparison:
    res = theirs["results"]
    worst, first = _prompt_divergence(ours, res, tol)
    identical = agreeing = 0
    real_split = False
    for a, b in zip(ours, res):
        n = next((k for k, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        agreeing += n
        identical += n == len(a["tokens"])
        if n:  # the generated tokens both engines share are scored like prompt tokens
            ours_lp = a["step_logprobs"][torch.arange(n), torch.tensor(a["tokens"][:n])]
            worst = max(worst, float((ours_lp - torch.tensor(b["logprobs"][:n], dtype=torch.float64)).abs().max()))
        if n < len(a["tokens"]):  # near-tie: their token is (almost) as likely as ours under our model
            step = a["step_logprobs"][n]
            real_split |= bool(step[a["tokens"][n]] - step[b["tokens"][n]] > tol)
    div = ({"prompt": first[0], "length": len(prompts[first[0]]), "position": first[1], "dlogprob": first[2]}
           if first else {})
    versions = {k: v for k, v in theirs.items() if k.endswith("_version")}
    return EngineComparison(engine, versions, tol, worst, [len(p) for p in prompts], identical, agreeing,
                            sum(len(a["tokens"]) for a in ours), div, real_split)


def prepare(model, vocab_size: int, max_len: int, data_dir=None) -> tuple:
    """(prompts, our reference) for an export of `model` trained at context `max_len`."""
    prompts = engine_prompts(prompt_lengths(max_len), vocab_size, data_dir)
    return prompts, reference(model, prompts)


def check_engine(model, hf_dir: str, vocab_size: int, max_len: int, dtype: str = "fp32", engine: str = "vllm",
                 data_dir=None, log=lambda m: None) -> EngineComparison:
    """The whole check for an exported folder `hf_dir` of `model` (the model as exported)."""
    python = engine_python(engine)
    lengths = prompt_lengths(max_len)
    log(f"{engine}: {len(lengths)} prompts of {lengths[0]}-{lengths[-1]} tokens, {GEN_TOKENS} greedy tokens each; "
        "computing ours")
    prompts, ours = prepare(model, vocab_size, max_len, data_dir)
    log(f"{engine}: starting the engine in {os.path.dirname(os.path.dirname(python))}")
    theirs = run_vllm(hf_dir, prompts, GEN_TOKENS, max_len, python)
    return compare(ours, theirs, prompts, MAX_DLOGPROB[dtype], engine)
