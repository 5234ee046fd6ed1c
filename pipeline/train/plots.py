"""Learning curves: loss and per-structure validation Dice per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curve(history: list[dict], path: Path, title: str, structures: Sequence[str]) -> None:
    """The paper's Fig. 6 layout: training loss left, validation Dice per structure right."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, [h["loss"] for h in history])
    a.set(title="training loss", xlabel="epoch")
    scored = [s for s in structures if s in history[0] and history[0][s] == history[0][s]]
    for s in scored:
        b.plot(epochs, [h[s] for h in history], label=s)
    b.set(title="validation Dice" if scored else "validation Dice: no held-out images",
          xlabel="epoch", ylim=(0, 1))
    if scored:
        b.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
