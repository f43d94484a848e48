"""Aux-loss-free balancing (DeepSeek-V3): per-expert bias updated outside the gradient."""
import pytest
import torch

from moetrain.config import config_from_dict
from moetrain.model import build_model
from moetrain.model.moe import MoE, moe_layers, update_expert_bias

E, K, D = 8, 2, 16


def skewed_router(router: str, speed: float) -> tuple:
    cfg = config_from_dict({"model": dict(vocab_size=50, hidden_size=D, n_layers=1, n_heads=4, n_kv_heads=2,
                                          intermediate_size=32, moe=dict(router=router, n_experts=E, top_k=K,
                                                                         intermediate_size=8,
                                                                         bias_update_speed=speed))}).model
    torch.manual_seed(0)
    mod = MoE(cfg)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with torch.no_grad():  # experts favoured in proportion to their index along a shared input direction
        mod.router.gate.weight.copy_(0.5 * torch.randn(E, D) + torch.linspace(0, 2, E)[:, None] * u)
    return mod, u


@pytest.mark.parametrize("router,speed", [("softmax", 0.02), ("sigmoid", 0.002)])
def test_bias_balances_a_skewed_router_within_bounded_steps(router, speed):
    mod, u = skewed_router(router, speed)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    imbalance = []
    try:
        for _ in range(300):
            with torch.no_grad():
                r = mod.router(torch.randn(2048, D, generator=g) + u)
            counts = torch.bincount(r.experts_TK.flatten(), minlength=E)
            imbalance.append(float(counts.max() / counts.float().mean()))
            update_expert_bias(mod, [counts])
    finally:
        torch.set_num_threads(threads)
    assert imbalance[0] > 1.8  # the problem really is skewed
    first = next(i for i, v in enumerate(imbalance) if v < 1.2)
    assert first <= 150, first
    assert sum(imbalance[-50:]) / 50 < 1.15 and max(imbalance[-50:]) < 1.3  # and it stays balanced
    assert mod.router.expert_bias[0] > mod.router.expert_bias[-1]  # the starved expert was pushed up


def test_update_follows_layer_order_and_skips_layers_without_bias():
    cfg = config_from_dict({"model": dict(vocab_size=50, hidden_size=D, n_layers=3, n_heads=4, n_kv_heads=2,
                                          intermediate_size=32, moe=dict(n_experts=4, top_k=1, first_k_dense=1,
                                                                         bias_update_speed=0.1))}).model
    model = build_model(cfg)
    layers = moe_layers(model)
    assert len(layers) == 2
    update_expert_bias(model, [torch.tensor([10, 0, 0, 2]), torch.tensor([3, 3, 3, 3])])
    torch.testing.assert_close(layers[0].router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(layers[1].router.expert_bias, torch.zeros(4))
    sd = model.state_dict()
    assert torch.equal(sd["layers.1.mlp.router.expert_bias"], layers[0].router.expert_bias)  # saved in checkpoints
    plain = build_model(config_from_dict({"model": dict(vocab_size=50, hidden_size=D, n_layers=1, n_heads=4,
                                                        n_kv_heads=2, intermediate_size=32)}).model)
    update_expert_bias(plain, [torch.tensor([1, 0, 0, 0, 0, 0, 0, 9])])  # no bias buffers: nothing to do
