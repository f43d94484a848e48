"""Our MoE block == transformers' Mixtral / Qwen2-MoE sparse blocks given the same weights."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import MixtralConfig, Qwen2MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from moetrain.config import config_from_dict  # noqa: E402
from moetrain.model.moe import MoE  # noqa: E402

D, F, E, K = 32, 24, 6, 2


def ours(**moe) -> MoE:
    m = dict(n_experts=E, top_k=K, intermediate_size=F, aux_loss_coef=0.0, z_loss_coef=0.0)
    m.update(moe)
    cfg = config_from_dict({"model": dict(vocab_size=50, hidden_size=D, n_layers=1, n_heads=4, n_kv_heads=2,
                                          intermediate_size=64, moe=m)}).model
    torch.manual_seed(0)
    mod = MoE(cfg)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mod


@torch.no_grad()
def copy_routed(hf, mod: MoE) -> dict:
    """HF 5.x fuses [gate; up] as experts.gate_up_proj (E, 2F, d); down_proj is (E, d, F) like ours.
    Returns HF parameter name -> (our parameter, how to turn its grad into ours)."""
    hf.gate.weight.copy_(mod.router.gate.weight)
    hf.experts.gate_up_proj.copy_(torch.cat([mod.experts.gate_EFd, mod.experts.up_EFd], dim=1))
    hf.experts.down_proj.copy_(mod.experts.down_EdF)
    return {"gate.weight": mod.router.gate.weight, "experts.down_proj": mod.experts.down_EdF}


def compare(hf, mod: MoE, pairs: dict, impl: str):
    hf.experts.config._experts_implementation = impl
    x = torch.randn(3, 17, D)
    g = torch.randn(3, 17, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = mod(xa)
    yb = hf(xb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    for name, p in pairs.items():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    gu = hf.experts.gate_up_proj.grad
    torch.testing.assert_close(torch.cat([mod.experts.gate_EFd.grad, mod.experts.up_EFd.grad], 1), gu,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_matches_mixtral_sparse_block(impl):
    mod = ours()
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                             num_experts_per_tok=K, router_jitter_noise=0.0))
    compare(hf, mod, copy_routed(hf, mod), impl)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_matches_qwen2_moe_sparse_block_with_gated_shared_expert(impl):
    mod = ours(norm_topk_prob=False, n_shared_experts=1, shared_expert_intermediate_size=40, shared_expert_gate=True)
    hf = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                               num_experts_per_tok=K, norm_topk_prob=False,
                                               shared_expert_intermediate_size=40))
    pairs = copy_routed(hf, mod)
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_expert, proj).weight.copy_(getattr(mod.shared_experts, proj).weight)
            pairs[f"shared_expert.{proj}.weight"] = getattr(mod.shared_experts, proj).weight
        hf.shared_expert_gate.weight.copy_(mod.shared_gate.weight)
        pairs["shared_expert_gate.weight"] = mod.shared_gate.weight
    compare(hf, mod, pairs, impl)
