"""Tables of mean and spread over seeds from the `results.json` files of `tfhfp8 train`.

    python -m models.policy_comparison --root=docs/results --plot=docs/results.png

Reads ROOT/<experiment>/seed*/results.json and prints one Markdown table per experiment:
final test accuracy per policy, mean and standard deviation over seeds, the difference
of the means from float32, and the mean wall time. With --plot, also a figure: one
panel per experiment, each seed's final test accuracy per policy and their mean.
"""

import json
import pathlib

import numpy as np
from absl import app, flags

_ROOT = flags.DEFINE_string("root", "results", "Folder of <experiment>/seed*/results.json.")
_PLOT = flags.DEFINE_string("plot", None, "Write the figure to this file (e.g. a .png).")


def load(root):
    """{experiment: [results.json dicts, one per seed]} for every experiment under root."""
    experiments = {}
    for folder in sorted(p for p in pathlib.Path(root).iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted(folder.glob("seed*/results.json"))]
        if runs:
            experiments[folder.name] = runs
    return experiments


def accuracies(runs):
    """{policy: array of final test accuracies (%) over seeds}."""
    return {p: np.array([100 * r["policies"][p]["test_accuracy"] for r in runs])
            for p in runs[0]["policies"]}


def experiment_table(runs):
    """A Markdown table from a list of results.json dicts (one per seed)."""
    accuracy = accuracies(runs)
    seconds = {p: np.mean([r["policies"][p]["seconds"] for r in runs]) for p in accuracy}
    base = accuracy["float32"].mean() if "float32" in accuracy else None
    lines = ["| policy | test accuracy (mean ± std) | per seed | vs float32 | seconds |",
             "|---|---|---|---|---|"]
    for p, a in accuracy.items():
        diff = "" if base is None else f"{a.mean() - base:+.2f} pt"
        seeds = ", ".join(f"{v:.2f}" for v in a)
        lines.append(f"| {p} | {a.mean():.2f} ± {a.std(ddof=1) if a.size > 1 else 0:.2f} % "
                     f"| {seeds} | {diff} | {seconds[p]:.0f} |")
    return "\n".join(lines)


def plot(experiments, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(experiments), figsize=(4.2 * len(experiments), 3.6),
                             squeeze=False)
    for ax, (name, runs) in zip(axes[0], experiments.items()):
        accuracy = accuracies(runs)
        for i, a in enumerate(accuracy.values()):
            ax.scatter(np.full(a.size, i), a, color="tab:gray", s=18, zorder=2,
                       label="one seed" if i == 0 else None)
            ax.scatter([i], [a.mean()], color="tab:red", marker="_", s=400, zorder=3,
                       label="mean" if i == 0 else None)
        ax.set_xticks(range(len(accuracy)), list(accuracy), rotation=30)
        ax.set_title(f"{name}\n({len(runs)} seeds)", fontsize=10)
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"Wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    experiments = load(_ROOT.value)
    if not experiments:
        raise app.UsageError(f"no <experiment>/seed*/results.json under {_ROOT.value}")
    for name, runs in experiments.items():
        config = runs[0]["config"]
        print(f"### {name}: {len(runs)} seed(s), {config.get('epochs')} epoch(s), "
              f"{config['train_examples']} training / {config['test_examples']} test examples, "
              f"batch {config.get('batch_size')}, loss scaling {config.get('loss_scaling')}\n")
        print(experiment_table(runs) + "\n")
    if _PLOT.value:
        plot(experiments, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
