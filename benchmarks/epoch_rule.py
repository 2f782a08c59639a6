"""Which epoch should a run ship? Each rule, judged on the test set across seed replicates.

    python benchmarks/epoch_rule.py               # 30 seeds of the default cnn, mlp and the tuned final cnn
    python benchmarks/epoch_rule.py --seeds 4 --models cnn

A run ships one epoch's weights, chosen on validation (never on test). The rules:
- `best`: the epoch with the best monitored validation value (one validation pass, however lucky:
  `train.monitor_window: 1`);
- `smoothed`: the epoch ending the best window of `--window` epochs by their mean validation value, as `train`
  ships it (`train.monitor_window`);
- `last`: the last epoch (the end of the schedule).
Every model trains its seeds as one population, as `train` does; after each epoch a callback predicts the test
split with the run's weights (no randomness drawn, so training is the same with or without it). Each rule's
shipped epoch is then looked up: mean and std over seeds of test accuracy and test loss, and each rule's paired
difference from `best` with a 95% t interval over the seeds. Prints the table and writes it to docs/epoch-rule.md
(with the machine and date that measured it) and every number to docs/epoch-rule.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from bench import cpu_name, digits  # noqa: E402
from pipeline import batching, data, loop, paths, population, processes, training  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.metrics import is_better  # noqa: E402

OUT = REPO / "docs" / "epoch-rule.json"  # beside its page (docs/bench/ holds one file per device)
PAGE = REPO / "docs" / "epoch-rule.md"


class TestEachEpoch(loop.Callback):
    """The test split's accuracy and loss after every epoch (a measurement only: nothing is chosen by it)."""

    def __init__(self, batches):
        self.batches, self.accuracy, self.loss = batches, [], []

    def on_fit_start(self, model, history) -> None:
        self.model = model

    def on_epoch_end(self, metrics) -> None:
        labels, probabilities = loop.predict(self.model, self.batches, torch.device("cpu"))
        self.accuracy.append(float((probabilities.argmax(1) == labels).float().mean()))
        picked = probabilities[torch.arange(len(labels)), labels].clamp_min(1e-12)
        self.loss.append(float(-picked.log().mean()))


def shipped_epoch(rule: str, history: list, monitor: str, window: int) -> int:
    """The index of the epoch `rule` ships (the first of equals), by the loop's own smoothing (`loop.smoothed`)."""
    if rule == "last":
        return len(history) - 1
    width = window if rule == "smoothed" else 1
    scores = [loop.smoothed(history[: i + 1], monitor, width) for i in range(len(history))]
    best = 0
    for index, score in enumerate(scores):
        if is_better(monitor, score, scores[best]):
            best = index
    return best


def final_overrides() -> list[str]:
    """The tuned final model's params, as `train_final` gets them (the search's shipped params)."""
    best = REPO / paths.BEST_PARAMS
    if not best.exists():
        return []
    return [f"{key}={value}" for key, value in json.loads(best.read_text())["params"].items()]


def tuned() -> str:
    if not (REPO / paths.BEST_PARAMS).exists():
        return "none: the untuned settings"
    record = json.loads((REPO / paths.BEST_PARAMS).read_text())
    shown = (f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
             for key, value in record["params"].items())
    return f"{paths.BEST_PARAMS}: trial {record['trial']}, " + ", ".join(shown)


def measure(name: str, overrides: list[str], seeds: int, prepared: data.PreparedData, window: int,
            rules: list[str]) -> dict:
    device = torch.device("cpu")
    cfg = load_config(REPO / "params.yaml", [*overrides, f"replicates={seeds}", "tracking.enabled=false",
                                             "train.device=cpu", "train.resume=false"])
    runs, observers = [], []
    for each in training.replicate_configs(cfg):
        model, train_batches, val_batches = training.setup(each, prepared, device)
        test = batching.eval_batches(prepared.test, prepared.mean, prepared.std, device)
        observers.append(TestEachEpoch(test))
        runs.append(loop.Run(model, each.train, train_batches, val_batches, [observers[-1]]))
    tick = time.perf_counter()
    population.fit_together(runs, device)
    seconds = time.perf_counter() - tick
    monitor = cfg.train.monitor
    result = {"overrides": overrides, "epochs": cfg.train.epochs, "monitor": monitor, "seconds": seconds,
              "seeds": [each.seed for each in training.replicate_configs(cfg)], "rules": {}}
    for rule in rules:
        picks = [shipped_epoch(rule, run.result.history, monitor, window) for run in runs]
        accuracy = [seen.accuracy[pick] for seen, pick in zip(observers, picks)]
        loss = [seen.loss[pick] for seen, pick in zip(observers, picks)]
        result["rules"][rule] = {"epochs": [pick + 1 for pick in picks], "test_accuracy": accuracy,
                                 "test_loss": loss}
    if window == cfg.train.monitor_window:  # the loop ships what this script says the smoothed rule ships
        assert [run.result.best_epoch for run in runs] == result["rules"]["smoothed"]["epochs"]
    base = result["rules"][rules[0]]
    for rule in rules[1:]:
        for key in ("test_accuracy", "test_loss"):
            diff = np.subtract(result["rules"][rule][key], base[key])
            low, high = (stats.ttest_1samp(diff, 0).confidence_interval(0.95) if diff.std() > 0
                         else (float(diff.mean()),) * 2)
            result["rules"][rule][f"{key}_vs_{rules[0]}"] = [float(diff.mean()), float(low), float(high)]
    print(f"[epoch-rule] {name}: {seeds} seeds x {cfg.train.epochs} epochs in {seconds:.0f}s", file=sys.stderr)
    return result


def shown(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def table(results: dict, rules: list[str]) -> str:
    lines = [f"| model | rule | shipped epochs (median) | test accuracy | test loss | Δ accuracy vs {rules[0]} "
             f"[95% CI] | Δ loss vs {rules[0]} [95% CI] |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for rule, row in result["rules"].items():
            deltas = ["" if f"{key}_vs_{rules[0]}" not in row else
                      "{:+.4f} [{:+.4f}, {:+.4f}]".format(*row[f"{key}_vs_{rules[0]}"])
                      for key in ("test_accuracy", "test_loss")]
            lines.append(f"| {name} | {rule} | {int(np.median(row['epochs']))} | {shown(row['test_accuracy'])} | "
                         f"{shown(row['test_loss'])} | {deltas[0]} | {deltas[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--window", type=int, default=load_config(REPO / "params.yaml").train.monitor_window,
                        help="epochs the smoothed rule averages (default: train.monitor_window)")
    parser.add_argument("--models", default="cnn,mlp,final")
    parser.add_argument("--threads", type=int, default=processes.available_cores())
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prepared = digits()
    rules = ["best", "smoothed", "last"]
    choices = {"cnn": ["model.name=cnn"], "mlp": ["model.name=mlp"],
               "final": ["model.name=cnn", *final_overrides()]}
    results = {name: measure(name, choices[name], args.seeds, prepared, args.window, rules)
               for name in args.models.split(",")}
    machine = f"{cpu_name()}, {processes.available_cores()} cores, {args.threads} thread(s)"
    page = table(results, rules)
    when = f"{datetime.now(timezone.utc):%Y-%m-%d}"
    print(f"{machine}, torch {torch.__version__}, {when}\n{page}")
    if args.out == OUT:  # the default measurement: the page shows it
        PAGE.write_text(f"# Which epoch ships\n\n`python benchmarks/epoch_rule.py --seeds {args.seeds}` on {machine}, "
                        f"torch {torch.__version__}, {when}: each rule's shipped epoch on the test set, mean ± std "
                        f"over {args.seeds} seeds (trained as one population each), and its paired difference "
                        f"from `best` with a 95% t interval over the seeds. `smoothed` is the mean over "
                        f"{args.window} epochs (`train.monitor_window`), what `train` ships. `final` trains "
                        f"with the params the search shipped ({tuned()}).\n\n{page}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "window": args.window,
                                    "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "models": results,
                                    "table": page}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
