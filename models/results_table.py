"""Tables of mean and spread over seeds from the `results.json` files of `tfhfp8 train`.

    python models/results_table.py results/

Reads ROOT/<experiment>/seed*/results.json and prints one Markdown table per experiment:
final test accuracy per policy, mean and standard deviation over seeds, the difference
of the means from float32, and the mean wall time.
"""

import json
import pathlib
import sys

import numpy as np


def experiment_table(runs):
    """A Markdown table from a list of results.json dicts (one per seed)."""
    policies = list(runs[0]["policies"])
    accuracy = {p: np.array([100 * r["policies"][p]["test_accuracy"] for r in runs])
                for p in policies}
    seconds = {p: np.mean([r["policies"][p]["seconds"] for r in runs]) for p in policies}
    base = accuracy["float32"].mean() if "float32" in accuracy else None
    lines = ["| policy | test accuracy (mean ± std) | per seed | vs float32 | seconds |",
             "|---|---|---|---|---|"]
    for p in policies:
        a = accuracy[p]
        diff = "" if base is None else f"{a.mean() - base:+.2f} pt"
        seeds = ", ".join(f"{v:.2f}" for v in a)
        lines.append(f"| {p} | {a.mean():.2f} ± {a.std(ddof=1) if a.size > 1 else 0:.2f} % "
                     f"| {seeds} | {diff} | {seconds[p]:.0f} |")
    return "\n".join(lines)


def main(root):
    root = pathlib.Path(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted(folder.glob("seed*/results.json"))]
        if not runs:
            continue
        config = runs[0]["config"]
        print(f"### {folder.name}: {len(runs)} seed(s), {config.get('epochs')} epoch(s), "
              f"{config['train_examples']} training / {config['test_examples']} test examples, "
              f"loss scaling {config.get('loss_scaling')}\n")
        print(experiment_table(runs) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results")
