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
