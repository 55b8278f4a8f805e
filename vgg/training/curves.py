"""Learning curves of a training run as a PNG (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any, Mapping

from vgg.paper import TOPK


def plot_curves(history: Mapping[str, Any], title: str) -> bytes:
    """PNG: training loss, and top-1/top-5 error (train, val) vs epoch; lr drops marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = history["epochs"]
    x = [r["epoch"] + 1 for r in recs]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in recs], "o-", label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: training loss")
    for split, style in (("train", "--"), ("val", "-")):
        for k in TOPK:
            ys = [r.get(f"{split}_top{k}_err") for r in recs]
            if all(y is not None for y in ys):
                ax_err.plot(x, [100 * y for y in ys], style, marker="o", label=f"{split} top-{k}")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="top-1 / top-5 error")
    for ax in (ax_loss, ax_err):
        for i, e in enumerate(history["lr_drops"]):  # the lr changes between epoch e and e+1
            ax.axvline(e + 1.5, color="grey", ls=":", label="lr / 10" if i == 0 else None)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
