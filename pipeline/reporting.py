"""Files for people and for DVC: markdown tables, long-format curve CSVs and matplotlib PNGs.

Every file goes through `files` (atomic writes). Nothing here holds wall-clock
times: these files are git-tracked or DVC outputs, and a deterministic re-run
must write the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import files
from pipeline.metrics import EpochMetrics


def long_curve_rows(histories: dict[str, Sequence[EpochMetrics]]) -> list[list]:
    """One row per (run, epoch, split): the shape DVC's `by_run` template colours by run."""
    rows = []
    for run, history in histories.items():
        for m in history:
            rows.append([m.epoch, run, "train", round(m.train_loss, 6), round(m.train_accuracy, 6)])
            rows.append([m.epoch, run, "val", round(m.val_loss, 6), round(m.val_accuracy, 6)])
    return rows


LONG_CURVE_COLUMNS = ("epoch", "run", "split", "loss", "accuracy")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # stages run headless
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: dict[str, Sequence], path: Path) -> None:
    """Loss and accuracy per epoch, train dashed and val solid, one colour per run."""
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, history) in enumerate(histories.items()):
        epochs = [m.epoch for m in history]
        colour = f"C{i}"
        loss_ax.plot(epochs, [m.train_loss for m in history], "--", color=colour, label=f"{name} train")
        loss_ax.plot(epochs, [m.val_loss for m in history], "-", color=colour, label=f"{name} val")
        acc_ax.plot(epochs, [m.train_accuracy for m in history], "--", color=colour, label=f"{name} train")
        acc_ax.plot(epochs, [m.val_accuracy for m in history], "-", color=colour, label=f"{name} val")
    loss_ax.set(title="loss", xlabel="epoch", yscale="log")
    acc_ax.set(title="accuracy", xlabel="epoch")
    acc_ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(matrix, classes: Sequence[str], path: Path, title: str) -> None:
    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.5, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    import numpy as np

    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_samples(images, labels: Sequence[str], path: Path, title: str) -> None:
    """A 3x3 grid of uint8 [N, C, H, W] images with their class names, like the tutorials' matplotlib grid."""
    plt = pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(6, 6.4))
    for ax, image, label in zip(axes.flat, images, labels):
        pixels = image.permute(1, 2, 0).numpy()
        ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", interpolation="nearest")
        ax.set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lr_range(lrs: Sequence[float], losses: Sequence[float], steepest: float, usable: Sequence[float],
                  path: Path, title: str) -> None:
    """The range test's smoothed loss against the learning rate (log scale), its steepest descent marked and the
    usable range shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(lrs, losses)
    ax.axvspan(*usable, color="C2", alpha=0.15, label=f"usable {usable[0]:.1e} .. {usable[1]:.1e}")
    ax.scatter([steepest], [losses[list(lrs).index(steepest)]], color="C3", zorder=3,
               label=f"steepest descent {steepest:.1e}")
    top = max(losses[: max(1, len(losses) // 4)])  # the untrained loss: what diverges beyond it is off the chart
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title=title,
           ylim=(min(losses) * 0.9, top * 1.3))
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """PNG with everything inside the canvas (bbox_inches="tight" keeps long labels and legends whole)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    files.write_bytes(path, buffer.getvalue())
    fig.clear()
    pyplot().close(fig)


def text_table(header: Sequence[str], rows: Sequence[Sequence], width: int, squeeze: int) -> str:
    """Columns aligned for a terminal, at most `width` characters a line: column `squeeze` gives up what the others
    leave over (its cells cut with "…")."""
    from pipeline.errors import shorten

    cells = [[str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    room = width - 2 * (len(header) - 1) - sum(w for i, w in enumerate(widths) if i != squeeze)
    widths[squeeze] = max(min(widths[squeeze], room), len(header[squeeze]))
    lines = []
    for row in cells:
        row[squeeze] = shorten(row[squeeze], widths[squeeze])
        lines.append("  ".join(value.ljust(w) for value, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
