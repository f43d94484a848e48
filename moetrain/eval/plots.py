"""PNG plots of the long-context evaluation (matplotlib, headless Agg backend)."""
from __future__ import annotations

import os


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)  # no display on training nodes
    import matplotlib.pyplot as plt
    return plt


def plot_loss_by_position(curves: dict, path: str, title: str) -> str:
    """curves: label -> loss_by_position result (bucket_start/bucket_end/loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, c in curves.items():
        mids = [(a + b) / 2 for a, b in zip(c["bucket_start"], c["bucket_end"])]
        ax.plot(mids, c["loss"], marker="o", label=label)
    ax.set_xlabel("position in context (bucket centre)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_passkey_heatmap(grid: dict, path: str, title: str) -> str:
    """Accuracy heatmap: depth (rows) x context length (columns), cells annotated."""
    plt = _pyplot()
    import numpy as np
    acc = np.array(grid["accuracy"], dtype=float).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 1.1 * acc.shape[1]), 1.6 + 0.5 * acc.shape[0]), dpi=110)
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(x) for x in grid["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:g}" for d in grid["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}\naccuracy % ({grid['trials']} trials per cell)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(result: dict, out_dir: str, title: str) -> list:
    """loss_by_position.png (one line per length) and passkey_heatmap.png, when there is data."""
    paths = []
    curves = {f"{n} tokens": c for n, c in result.get("loss_by_position", {}).items()}
    if curves:
        paths.append(plot_loss_by_position(curves, os.path.join(out_dir, "loss_by_position.png"),
                                           f"{title}: loss by position"))
    grid = result.get("passkey")
    if grid and grid["lengths"]:
        paths.append(plot_passkey_heatmap(grid, os.path.join(out_dir, "passkey_heatmap.png"),
                                          f"{title}: passkey"))
    return paths


def _stage_spans(records: list[dict]) -> list[tuple]:
    """(stage, first step, seq_len) in run order. A stage starts one step after the previous
    stage's stage_end event (logged steps may skip the first steps of a stage)."""
    spans, start = [], 1
    for r in records:
        if r.get("event") == "stage_end":
            start = r["step"] + 1
        elif "event" not in r and "loss" in r and (not spans or spans[-1][0] != r["stage"]):
            spans.append((r["stage"], start if spans else 1, r.get("seq_len")))
    return spans


def plot_training_curve(records: list[dict], path: str) -> str:
    """Train loss (and learning rate) over optimizer steps; held-out loss at each stage end;
    a dashed line and a label at every stage boundary."""
    plt = _pyplot()
    steps = [r for r in records if "event" not in r and "loss" in r]
    fig, ax = plt.subplots(figsize=(7.6, 4.2), dpi=110)
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.0, label="train loss (logged steps)")
    ends = [r for r in records if r.get("event") in ("stage_end", "run_end") and r.get("eval_loss") is not None]
    if ends:
        ax.plot([r["step"] for r in ends], [r["eval_loss"] for r in ends], "o", color="C3", label="held-out loss (stage end)")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="C2", lw=0.8, alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="C2")
    lr_ax.set_ylim(bottom=0)
    top = max([r["loss"] for r in steps] or [1.0])
    for i, (name, first, seq_len) in enumerate(_stage_spans(records)):
        if i:
            ax.axvline(first - 0.5, color="k", ls="--", lw=0.8)
        ax.text(first, top, f" {name}\n {seq_len} tokens", va="top", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training curve (dashed lines: stage boundaries)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    # below the axes: inside, it hid the held-out points and the stage labels
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_passkey_by_stage(rows: list[dict], path: str) -> str:
    """Grouped bars: passkey accuracy per evaluated length, one bar per stage-end model."""
    plt = _pyplot()
    lengths = sorted({int(n) for r in rows for n in r["passkey"]})
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(lengths))]
        accs = [100 * r["passkey"].get(str(n), float("nan")) for n in lengths]
        bars = ax.bar(xs, accs, width, label=f"after stage {r['stage']} (trained at {r['seq_len']})")
        for b, a in zip(bars, accs):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{a:.0f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(0, 110)
    trials = next((r["trials"] for r in rows if r.get("trials")), "?")
    ax.set_title(f"passkey retrieval after each stage\n({trials} trials per depth, greedy, exact match)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # never over a bar's label
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
