"""Memory tools (moetrain.parallel.memory): each one changes what is kept for backward,
never the result. Outputs, every gradient and the balancing losses equal the plain
model's; parameter names (checkpoints, export) are unchanged."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "moe"))
import moe_dist_workers as workers  # noqa: E402

from moetrain.model import build_model  # noqa: E402
from moetrain.model.moe import moe_layers  # noqa: E402
from moetrain.parallel import ParallelDims, parallelize  # noqa: E402
from moetrain.parallel.memory import TiledExperts, checkpoint_targets  # noqa: E402

TOOLS = {
    "full": {"memory.checkpoint": "full"},
    "attention": {"memory.checkpoint": "attention"},
    "mlp-every-2": {"memory.checkpoint": "mlp", "memory.checkpoint_every": 2},
    "offload": {"memory.offload": True},
    "tiled-7": {"memory.mlp_tile_tokens": 7},  # odd: the last tile is partial
    "all": {"memory.checkpoint": "full", "memory.offload": True, "memory.mlp_tile_tokens": 5},
}


def _cfg(tool: dict, **moe_kw):
    cfg = workers.tiny_cfg(**moe_kw)
    cfg.model.moe.first_k_dense = 1  # a dense SwiGLU block is tiled too
    cfg.model.n_layers = 3
    for key, value in tool.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


def _run(model, ids):
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_keeps_outputs_gradients_and_balancing_losses(name):
    cfg = _cfg(TOOLS[name], router_jitter=0.0)
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    tooled = copy.deepcopy(plain)
    parallelize(tooled, ParallelDims(world=1, rank=0), cfg, use_deepspeed=False)
    assert [n for n, _ in tooled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert tooled.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 19))
    a, b = _run(plain, ids), _run(tooled, ids)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(a.moe_stats, b.moe_stats):  # the router saw every token exactly as untiled
        for key in sa:
            if torch.is_tensor(sa[key]):
                torch.testing.assert_close(sb[key], sa[key], rtol=1e-6, atol=1e-7, msg=key)
    for (n, p), q in zip(plain.named_parameters(), tooled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # eval: the tools are inactive or exact
        plain.eval(), tooled.eval()
        torch.testing.assert_close(tooled(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)


def test_tiling_wraps_the_dispatcher_and_targets_follow_the_mode():
    cfg = _cfg(TOOLS["all"])
    model = build_model(cfg.model)
    parallelize(model, ParallelDims(world=1, rank=0), cfg, use_deepspeed=False)
    assert all(isinstance(m.dispatcher, TiledExperts) for m in moe_layers(model))
    parallelize(model, ParallelDims(world=1, rank=0), cfg, use_deepspeed=False)  # applying twice is a no-op
    assert not any(isinstance(m.dispatcher.inner, TiledExperts) for m in moe_layers(model))
    assert checkpoint_targets(model, "mlp", 2) == [model.layers[0].mlp, model.layers[2].mlp]
    assert checkpoint_targets(model, "none", 1) == []
    with pytest.raises(ValueError, match="memory.checkpoint='half' is not one of none, full, attention, mlp"):
        checkpoint_targets(model, "half", 1)


def test_legacy_flag_means_full_checkpointing():
    from moetrain.parallel.memory import resolve_checkpoint_mode
    cfg = _cfg({})
    cfg.model.activation_checkpointing = True
    assert resolve_checkpoint_mode(cfg) == "full"


def test_tiles_are_split_so_the_backward_does_not_grow_with_tiles_squared():
    """Each tile's input must come from one split of the whole tensor, not from a slice per
    tile: a slice's backward is a zero-filled tensor of the whole input, so T/tile of them
    cost O(T^2 / tile) (at a million tokens, terabytes of memset per layer)."""
    from moetrain.parallel.memory import tiled
    x = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(50, 2, requires_grad=True)
    y = tiled(lambda a, b: a * b.sum(-1, keepdim=True), 7, x, w)
    names, todo, seen = [], [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    assert not [n for n in names if n.startswith("Slice")], names
    assert sum(n.startswith("Split") for n in names) == 2, names  # one per tiled input
    y.backward(torch.ones_like(y))
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    (x2 * w2.sum(-1, keepdim=True)).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
