r"""Training with tensor-core sums: does Hopper's truncated FP8 sum hurt a Transformer,
does DeepSeek's promotion repair it, and what do Blackwell's MXFP8 sums do?

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 python -m models.tensor_cores.training \
        --seeds=0,1,2 --output_root=docs/results/tensor_cores_training
    python -m models.policy_comparison --root=docs/results/tensor_cores_training

Trains `tfhfp8 train`'s `transformer_classifier` on Rotten Tomatoes (the first
`--limit` training reviews, every test review) once per policy and seed, from the same
initial weights and data order per seed, under:

- `fp8_delayed`: E4M3 / E5M2 with Transformer Engine's per-tensor delayed scaling, FP32
  sums (the reference);
- `fp8_hopper`: the same summed as an H100 sums (fast accumulation forward, promotion
  every 128 products in dgrad and wgrad);
- `fp8_hopper_promoted`: the promotion in all three GEMMs (DeepSeek-V3);
- `mxfp8`: OCP MXFP8 operands, FP32 sums;
- `mxfp8_blackwell`: the same summed as a B200's `tcgen05.mma.block_scale` sums.

No loss scaling (the per-tensor and per-block scales cover the range, as in both
recipes). Each seed's `results.json` goes to OUTPUT_ROOT/transformer_rotten_tomatoes/
seed<S>/, which `models.policy_comparison` reads; `--table` prints, from those files,
the final test accuracy and training loss per policy (mean ± sd over seeds).
"""

import glob
import json
import pathlib

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tfhfp8  # noqa: E402
from tfhfp8 import experiment  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Seeds (initial weights, data order, split).")
_LIMIT = flags.DEFINE_integer("limit", 5120, "Training reviews (the first N).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs per run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_POLICIES = flags.DEFINE_list("policies", None, "Only these of the policies (by name).")
_OUTPUT_ROOT = flags.DEFINE_string("output_root", "results/tensor_cores_training",
                                   "Where <experiment>/seed<S>/results.json go.")
_TABLE = flags.DEFINE_boolean("table", False, "Only print the table of the results in "
                              "--output_root (no training).")


def table(root):
    """Markdown rows: per policy, final test accuracy and training loss over seeds."""
    runs = [json.loads(pathlib.Path(path).read_text()) for path in sorted(glob.glob(
        os.path.join(root, "transformer_rotten_tomatoes", "seed*", "results.json")))]
    lines = [f"{len(runs)} seeds", "| policy | test accuracy (%) | per seed | final "
             "training loss |", "|---|---|---|---|"]
    for name in runs[0]["policies"] if runs else ():
        accuracy = np.array([100 * r["policies"][name]["test_accuracy"] for r in runs])
        loss = np.array([r["policies"][name]["history"]["loss"][-1] for r in runs])
        lines.append(f"| {name} | {accuracy.mean():.2f} ± {accuracy.std(ddof=1):.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in accuracy)} | "
                     f"{loss.mean():.4f} ± {loss.std(ddof=1):.4f} |")
    return "\n".join(lines)


def policies():
    """The compared policies, by name."""
    mxfp8 = dict(weights="mxfp8_e4m3", activations="mxfp8_e4m3", errors="mxfp8_e5m2")
    return {policy.name: policy for policy in (
        tfhfp8.Policy("fp8_delayed"), tfhfp8.Policy("fp8_hopper"),
        tfhfp8.Policy("fp8_hopper_promoted"), tfhfp8.Policy("mxfp8"),
        tfhfp8.Policy("mxfp8_blackwell", **mxfp8, accumulation="nvidia_blackwell_mxfp8"))}


def main(argv, compared=policies):
    """Trains (or, with --table, tabulates) the policies `compared()` returns, by name
    (models.recipes passes its own)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _TABLE.value:
        print(table(_OUTPUT_ROOT.value))
        return
    chosen = compared()
    if _POLICIES.value:
        unknown = sorted(set(_POLICIES.value) - set(chosen))
        if unknown:
            raise app.UsageError(f"--policies: unknown {unknown}; known: {list(chosen)}")
        chosen = {name: chosen[name] for name in _POLICIES.value}
    for seed in _SEEDS.value:
        output_dir = os.path.join(_OUTPUT_ROOT.value, "transformer_rotten_tomatoes",
                                  f"seed{seed}")
        experiment.train_policies(
            "transformer_classifier", "rotten_tomatoes", list(chosen.values()),
            epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value, loss_scaling="none",
            seed=int(seed), output_dir=output_dir, limit=_LIMIT.value, verbose=0)
        print(f"Wrote {output_dir}/results.json", flush=True)


if __name__ == "__main__":
    app.run(main)
