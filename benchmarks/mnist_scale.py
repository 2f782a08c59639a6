"""Prepare and train-epoch time for MNIST-format data of 60,000 images, offline.

Writes official-format IDX files (random pixels: timing, not accuracy) to a
file:// mirror, points torchvision's expected MD5s at them in this process,
then runs the real download, prepare and train stages in a temp dir.

    python benchmarks/mnist_scale.py [--models mlp cnn] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from torchvision.datasets import MNIST

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from archives import mnist_files  # noqa: E402  (the tests' generator of official-format files)

from pipeline import stages  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mnist-scale-"))
    fake = mnist_files(n_train=60_000, n_test=10_000)
    mirror = work / "mirror"
    mirror.mkdir()
    for name, blob in fake.files.items():
        (mirror / name).write_bytes(blob)
    MNIST.resources = [(name, fake.md5(name)) for name, _ in MNIST.resources]
    os.chdir(work)

    cfg = load_config(REPO / "params.yaml", ["data.name=mnist", f"data.mirror={mirror.as_uri()}",
                                             f"train.epochs={args.epochs}", "tracking.enabled=false"])
    tick = time.perf_counter()
    stages.download(cfg)
    print(f"download (file:// mirror, MD5 checks)  {time.perf_counter() - tick:7.2f} s")
    tick = time.perf_counter()
    stages.prepare(cfg)
    print(f"prepare (decode + split + save)        {time.perf_counter() - tick:7.2f} s")
    for model in args.models:
        stages.train(cfg.with_overrides({"model.name": model}), model)
        history = (work / "reports/train" / model / "history.csv").read_text().splitlines()[1:]
        seconds = [float(line.split(",")[-1]) for line in history]
        print(f"train {model:<6} epoch seconds {', '.join(f'{s:.2f}' for s in seconds)} "
              f"({51_000 / min(seconds):,.0f} images/s at best)")


if __name__ == "__main__":
    main()
