r"""The error of a K-term dot product on each emulated matrix unit (issue 26).

    .venv/bin/python -m models.tensor_cores --json=docs/results/tensor_cores.json \
        --plot=docs/results/tensor_cores.png

For every named accumulator of `tfhfp8.fused_accumulation.HARDWARE` and K = 32 ..
16,384: `--trials` dot products of random values of the instruction's first input type
(every finite value up to 2^16 equally likely: bfloat16 and TF32 limited to FP16's
range; for MXFP8, E4M3 values quantized to MXFP8 along K first), once
non-negative (DeepSeek-V3's setting: truncation only loses) and once with random signs;
the relative error of `tfhfp8.matmul` against the exact sum (`math.fsum` of the exact
products), relative to the sum of |products| (so cancellation does not divide by ~0).
Max and median over the trials, as a table and one plot; FP32 sums (`tf.linalg.matmul`)
beside them.
"""

import dataclasses
import json
import math
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

import models  # noqa: E402
from tfhfp8 import program  # noqa: E402

_TRIALS = flags.DEFINE_integer("trials", 64, "dot products per K and accumulator")
_MAX_K = flags.DEFINE_integer("max_k", 16384, "largest K (powers of two from 32)")
_JSON = flags.DEFINE_string("json", None, "write the results here")
_PLOT = flags.DEFINE_string("plot", None, "write the plot here (PNG)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random operands")


def errors(accumulator, input_type, k, trials, signed, rng):
    """(max, median) relative error of `trials` K-term dot products."""
    import tfhfp8  # noqa: PLC0415

    fmt = tfhfp8.formats.get(input_type)  # MX: values of its elements, scaled as it scales
    values = (fmt.element if isinstance(fmt, tfhfp8.BlockScaled) else fmt).values()
    values = values[values <= 2.0 ** 16]  # bfloat16 within FP16's range: no product overflows
    a = rng.choice(values, size=(1, k))
    b = rng.choice(values, size=(k, trials))
    if signed:
        a = a * rng.choice([-1.0, 1.0], size=a.shape)
        b = b * rng.choice([-1.0, 1.0], size=b.shape)
    if isinstance(fmt, tfhfp8.BlockScaled):  # MX blocks along K may clip (OCP's scale):
        a = tfhfp8.quantize(a.astype(np.float32), fmt).numpy()  # measure the sums only
        b = tfhfp8.quantize(b.astype(np.float32), dataclasses.replace(fmt, axis=0)).numpy()
    got = tfhfp8.matmul(a.astype(np.float32), b.astype(np.float32), accumulator,
                        a_format=input_type, b_format=input_type).numpy()[0]
    products = a[0][:, None] * b  # exact in float64
    exact = np.array([math.fsum(column) for column in products.T])
    scale = np.abs(products).sum(axis=0)
    relative = np.abs(got - exact) / np.where(scale == 0, 1.0, scale)
    return float(relative.max()), float(np.median(relative))


def run(trials, max_k, seed):
    from tfhfp8.fused_accumulation import HARDWARE  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    ks = [2 ** p for p in range(5, int(math.log2(max_k)) + 1)]
    rows = []
    for name, accumulator in [("float32", None), *HARDWARE.items()]:
        input_type = accumulator.input_types[0] if accumulator else "float8_e4m3fn"
        for signed in (False, True):
            for k in ks:
                high, median = errors(name, input_type, k, trials, signed, rng)
                rows.append({"accumulator": name, "input_type": input_type, "k": k,
                             "signed": signed, "max": high, "median": median})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    names = list(dict.fromkeys(r["accumulator"] for r in rows))
    colors = plt.get_cmap("tab20").colors  # one color per accumulator (up to 20)
    for ax, signed in zip(axes, (False, True)):
        for index, name in enumerate(names):
            mine = [r for r in rows if r["accumulator"] == name and r["signed"] == signed]
            style = "--" if name == "float32" else ("-" if "fp8" in name else ":")
            ax.loglog([r["k"] for r in mine], [r["max"] for r in mine], style,
                      marker="o", markersize=3, label=name, color=colors[index % 20])
        ax.set_title(("random signs" if signed else "non-negative") +
                     ": max relative error (vs sum of |products|)")
        ax.set_xlabel("K")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative error")
    axes[1].legend(fontsize=7)
    exact = [name for name in names if all(r["max"] == 0 for r in rows
                                            if r["accumulator"] == name)]
    if exact:  # no point on a log scale
        figure.text(0.01, 0.01, f"exact (error 0) at every K: {', '.join(exact)}",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    rows = run(_TRIALS.value, _MAX_K.value, _SEED.value)
    if _JSON.value:
        with open(_JSON.value, "w") as file:
            json.dump({"cpu": models.cpu_name(), "trials": _TRIALS.value,
                       "seed": _SEED.value, "rows": rows}, file, indent=1)
    if _PLOT.value:
        plot(rows, _PLOT.value)


if __name__ == "__main__":
    program.run(main)
