"""Write real DeepSpeed checkpoints of tiny models, the way the trainer does.

    python make_checkpoints.py OUT DATA_DIR SPEC [SPEC ...]            (1 process)
    python -m torch.distributed.run --nproc_per_node 2 make_checkpoints.py OUT DATA_DIR SPEC ...

SPEC is NAME:ZERO:EP:ROPE, e.g. mixtral_z3:3:1:yarn or qwen2_z2_ep2:2:2:llama3: the
architecture flavour comes from NAME (see tiny_config), ROPE is the final stage's
scaling (stage 1 runs 16 tokens, stage 2 32 tokens extending it by 2x). Each run folder gets
config.yaml and checkpoints/step_00000002/ written through the engine exactly as
the trainer does (parallelize -> build_engine -> a few optimizer steps -> checkpoint.save),
plus reference.pt: the engine's own logits on a fixed batch (every rank runs the
forward, as ZeRO-3 and expert parallelism need) so the test can check that
consolidation reproduces the trained model, not just some model.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from export_helpers import tiny_config  # noqa: E402


def reference_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 384, (2, 40), generator=g)


def write_run(out: str, data_dir: str, spec: str, rank: int, world: int) -> None:
    import dataclasses

    from moetrain.config import dump_yaml, to_dict
    from moetrain.model import build_model
    from moetrain.parallel import ParallelDims, parallelize
    from moetrain.parallel.engine import build_engine
    from moetrain import checkpoint as ckpt
    from moetrain.train.trainer import resolve_config
    from moetrain.train.schedule import plan_stages

    name, zero, ep, rope = spec.split(":")
    cfg = resolve_config(tiny_config(name, int(zero), int(ep), rope, data_dir))
    run = os.path.join(out, name)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    plan = plan_stages(cfg, world)[-1]  # train in the final stage, as the last checkpoint of a run would be
    rope = dataclasses.replace(plan.rope, original_max_position_embeddings=plan.original_max_position_embeddings)
    model.set_rope(rope, plan.seq_len)
    model.set_attention(plan.attention)
    par = parallelize(model, ParallelDims.from_config(cfg, world, rank), cfg)
    engine = build_engine(model, cfg, par, 2, 1)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(3, 384, (2, plan.seq_len + 1), generator=g)
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
        engine.backward(loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        logits = engine(reference_batch()).logits.float().cpu()
    client = {"step": 2, "stage": 1, "step_in_stage": 1, "tokens": 0, "wandb_id": None, "world_size": world,
              "stage_name": plan.name, "config": to_dict(cfg), "history": []}
    if rank == 0:
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))
        torch.save({"logits": logits}, os.path.join(run, "reference.pt"))
    ckpt.save(engine, os.path.join(run, "checkpoints"), 2, client, {"loader": None}, rank, 1, par.ep_groups)


def main(argv) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    from moetrain.parallel.engine import init_distributed
    rank, world, _ = init_distributed()
    out, data_dir, specs = argv[0], argv[1], argv[2:]
    for spec in specs:
        write_run(out, data_dir, spec, rank, world)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
