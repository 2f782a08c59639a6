"""Files for people and for DVC: csv/json/markdown tables and matplotlib PNGs.

All writes go through `write_text` (temp file + rename), so an interrupted
stage never leaves half a report that looks whole.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_file(source: Path, dest: Path) -> None:
    """Byte copy under a temporary name, then rename: like every write here."""
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_csv(path: Path, header: Sequence[str], rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def history_rows(history) -> list[list]:
    return [[m.epoch, *(round(getattr(m, c), 6) for c in HISTORY_COLUMNS[1:])] for m in history]


def long_curve_rows(histories: dict[str, Sequence]) -> list[list]:
    """One row per (run, epoch, split): the shape DVC's `by_run` template colours by run."""
    rows = []
    for run, history in histories.items():
        for m in history:
            rows.append([m.epoch, run, "train", round(m.train_loss, 6), round(m.train_accuracy, 6)])
            rows.append([m.epoch, run, "val", round(m.val_loss, 6), round(m.val_accuracy, 6)])
    return rows


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


def save_figure(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    fig.clear()
    pyplot().close(fig)
