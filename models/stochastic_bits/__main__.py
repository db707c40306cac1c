r"""Bias and variance of stochastic rounding with few random bits (issue 28, part a).

    .venv/bin/python -m models.stochastic_bits --json=docs/results/stochastic_bits.json \
        --plot=docs/results/stochastic_bits.png

For r = 1 .. `--max_bits` random bits and each r-bit variant of
`tfhfp8.formats.roundings` (`stochastic_r<r>`: the input's fraction of the gap rounded
to r bits, ties to even, plus the r random bits reaching 2^r rounds away from zero;
`stochastic_odd_r<r>`: ties to odd; `stochastic_fast_r<r>`: the fraction plus
(bits + 1/2) / 2^r reaching 1), with the full-precision `"stochastic"` as baseline:
`--draws` roundings (`tfhfp8.quantize` with a seed, float32) of inputs between 1 and the
next value of `--format`:

- fixed inputs at the fractions 0.1, 0.3, 1/3 and 0.49 of the gap (as float32 values:
  21-bit fractions in p3109_k8p3se), and 5 * 2^-18 (a small fraction of 18 bits);
- "ties": every (r + 1)-bit tie (2k + 1) / 2^(r + 1) of the gap in turn, the inputs
  where the variants differ, `--draws` roundings over all of them together.

Per input: the mean signed rounding error in units of the gap (the bias), its variance
and standard error, next to the exact values from the rounding's definition (exact
fractions): the draws check them where they rise above the sampling noise. JSON rows go
to stdout as they come; `--json` and `--plot` (log |bias| against r, one line per
variant and a panel per input) refuse to replace an existing file without `--overwrite`.
"""

import json
import math
import os
from fractions import Fraction

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import models  # noqa: E402
from tfhfp8 import program  # noqa: E402

_FORMAT = flags.DEFINE_string("format", "p3109_k8p3se", "the format rounded to")
_DRAWS = flags.DEFINE_integer("draws", 10**6, "roundings per input (and per set of ties)",
                              lower_bound=1)
_MAX_BITS = flags.DEFINE_integer("max_bits", 16, "largest number of random bits r",
                                 lower_bound=1, upper_bound=23)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the first rounding (one more per call)")
_JSON = flags.DEFINE_string("json", None, "write the results here")
_PLOT = flags.DEFINE_string("plot", None, "write the plot here (PNG)")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "replace existing --json/--plot files")

VARIANTS = ("stochastic", "stochastic_odd", "stochastic_fast")
FIXED = (("0.1", 0.1), ("0.3", 0.3), ("1/3", 1 / 3), ("0.49", 0.49), ("5*2^-18", 5 * 2.0**-18))
TIES = "ties"


def exact_up(variant, r, fraction):
    """The probability of rounding away from zero of an input at `fraction` (a Fraction)
    of the gap, from the rounding's definition (`r` None: the full-precision draw)."""
    if r is None:
        return fraction
    scaled = fraction * 2**r
    if variant == "stochastic_fast":  # up iff bits >= 2^r - scaled - 1/2
        return Fraction(math.floor(scaled + Fraction(1, 2)), 2**r)
    floor = math.floor(scaled)
    rest = scaled - floor
    tie_up = (floor % 2 == 1) == (variant == "stochastic")  # to even / to odd
    rounded = floor + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and tie_up))
    return Fraction(rounded, 2**r)


def exact_moments(variant, r, fractions):
    """(bias, variance) of the rounding error, in units of the gap, of inputs drawn
    equally often from `fractions` (the law of total variance over the inputs)."""
    ups = [exact_up(variant, r, f) for f in fractions]
    biases = np.array([float(up - f) for up, f in zip(ups, fractions)])
    within = np.mean([float(up * (1 - up)) for up in ups])
    return float(biases.mean()), float(within + biases.var())


def neighbours(fmt):
    """(low, gap): 1.0 and the distance to the next value of the FloatFormat `fmt`."""
    values = fmt.values()
    index = int(np.searchsorted(values, 1.0))
    if index + 1 >= len(values) or values[index] != 1.0:
        raise app.UsageError(f"--format: {fmt.name or fmt} has no value above 1.0")
    return 1.0, float(values[index + 1] - 1.0)


def inputs(low, gap, r, draws):
    """{label: (float32 inputs of one row, their exact fractions of the gap)}: the fixed
    inputs, and the (r + 1)-bit ties where they are float32 values."""
    rows = {}
    for label, fraction in FIXED:
        x = np.float32(low + gap * fraction)  # the fraction of the float32 value, exactly
        exact = (Fraction(float(x)) - Fraction(low)) / Fraction(gap)
        rows[label] = (np.full(draws, x), [exact])
    if r is not None:
        ties = [Fraction(2 * k + 1, 2 ** (r + 1)) for k in range(2**r)]
        exact = [Fraction(low) + Fraction(gap) * f for f in ties]
        x = np.array([float(v) for v in exact], np.float32)
        if all(Fraction(float(v)) == e for v, e in zip(x, exact)):
            rows[TIES] = (np.tile(x, max(1, draws // 2**r)), ties)  # each tie equally often
    return rows


def measure(fmt, rounding, x, gap, seed):
    """(mean, variance) of the rounding error (q(x) - x) / gap over the elements of `x`."""
    import tensorflow as tf  # noqa: PLC0415

    import tfhfp8  # noqa: PLC0415

    y = tfhfp8.quantize(tf.constant(x), fmt, rounding=rounding, seed=seed)
    error = (tf.cast(y, tf.float64) - tf.cast(x, tf.float64)) / gap
    return float(tf.reduce_mean(error)), float(tf.math.reduce_variance(error))


def run(fmt, draws, max_bits, seed):
    """Every row of the study: one per (input, rounding)."""
    from tfhfp8.formats import roundings  # noqa: PLC0415

    low, gap = neighbours(fmt)
    settings = [("stochastic", None)] + [(v, r) for r in range(1, max_bits + 1)
                                         for v in VARIANTS]
    rows = []
    for variant, r in settings:
        rounding = variant if r is None else roundings.with_random_bits(variant, r)
        for label, (x, fractions) in inputs(low, gap, r, draws).items():
            seed += 1  # independent bits for every call
            bias, variance = measure(fmt, rounding, x, gap, seed)
            exact_bias, exact_variance = exact_moments(variant, r, fractions)
            rows.append({
                "input": label, "fraction": float(np.mean([float(f) for f in fractions])),
                "variant": "full_precision" if r is None else variant, "random_bits": r,
                "rounding": rounding, "draws": len(x), "bias": bias, "variance": variance,
                "stderr": math.sqrt(variance / len(x)), "exact_bias": exact_bias,
                "exact_variance": exact_variance})
            print(json.dumps(rows[-1]), flush=True)
    return rows, low, gap


def plot(rows, path, title):
    """One panel per input: |bias| against r, measured (markers) and exact (lines)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = list(dict.fromkeys(row["input"] for row in rows))
    figure, axes = plt.subplots(2, math.ceil(len(labels) / 2), figsize=(15, 8),
                                sharex=True, sharey=True, squeeze=False)
    for ax, label in zip(axes.ravel(), labels):
        mine = [row for row in rows if row["input"] == label]
        for variant, color, style in zip(VARIANTS, ("C0", "C1", "C2"), ("-", "--", ":")):
            line = [row for row in mine if row["variant"] == variant]
            r = [row["random_bits"] for row in line]
            ax.semilogy(r, [abs(row["bias"]) for row in line], "o", color=color,
                        markersize=4, label=f"{variant}_r (measured)")
            exact = [(b, abs(row["exact_bias"])) for b, row in zip(r, line)
                     if row["exact_bias"] != 0]  # exact 0: nothing to draw on a log axis
            if exact:
                ax.semilogy(*zip(*exact), style, color=color, alpha=0.7,
                            label=f"{variant}_r (exact)")
        r = sorted({row["random_bits"] for row in mine if row["random_bits"]})
        ax.semilogy(r, [2.0 ** -(b + 1) for b in r], "k--", lw=0.8, label="2^-(r+1)")
        noise = [(row["random_bits"], row["stderr"]) for row in mine
                 if row["variant"] == "stochastic" and row["stderr"] > 0]
        if noise:
            ax.semilogy(*zip(*noise), "k:", lw=0.8, label="standard error")
        for row in mine:
            if row["variant"] == "full_precision":
                ax.axhline(abs(row["bias"]), color="grey", lw=0.8,
                           label="full precision (measured)")
        ax.set_title(f"input at {label} of the gap" if label != TIES
                     else "every (r+1)-bit tie, mean")
        ax.set_xlabel("random bits r")
        ax.set_xticks(r[::max(1, len(r) // 8)])
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("|bias| (units of the gap)")
    for ax in axes.ravel()[len(labels):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _check_outputs():
    """Refuse before any work to replace a file unasked, or to write into no folder."""
    for flag, path in (("json", _JSON.value), ("plot", _PLOT.value)):
        if path is None:
            continue
        if os.path.exists(path) and not _OVERWRITE.value:
            raise app.UsageError(f"--{flag}: {path} exists; pass --overwrite to replace it")
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise app.UsageError(f"--{flag}: no folder {os.path.dirname(path)!r}")


def main(argv):
    del argv
    import tfhfp8  # noqa: PLC0415

    _check_outputs()
    try:
        fmt = tfhfp8.formats.get(_FORMAT.value)
    except ValueError as error:
        raise app.UsageError(f"--format: {error}") from None
    if not isinstance(fmt, tfhfp8.FloatFormat):
        raise app.UsageError(f"--format must be a float format, got {_FORMAT.value!r}")
    rows, low, gap = run(fmt, _DRAWS.value, _MAX_BITS.value, _SEED.value)
    if _JSON.value:
        with open(_JSON.value, "w") as file:
            json.dump({"cpu": models.cpu_name(), "format": _FORMAT.value, "low": low,
                       "gap": gap, "draws": _DRAWS.value, "seed": _SEED.value,
                       "backend": tfhfp8.ops.backend_info()["backend"], "rows": rows},
                      file, indent=1)
    if _PLOT.value:
        plot(rows, _PLOT.value, f"Stochastic rounding with r random bits to {_FORMAT.value} "
             f"between {low:g} and {low + gap:g}: bias over {_DRAWS.value:,} draws")


if __name__ == "__main__":
    program.run(main)
