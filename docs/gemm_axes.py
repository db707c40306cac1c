"""Draws docs/gemm_axes.png: along which axis each operand of a Dense layer's three
GEMMs is blocked (what `tfhfp8.gemm.axes` computes).

    python docs/gemm_axes.py            # writes docs/gemm_axes.png
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from tfhfp8.gemm.axes import GemmAxes  # noqa: E402

TOKENS, IN, OUT, BLOCK = 8, 8, 6, 4  # a small Dense layer, blocks of 4
SIZES = {"x": (TOKENS, IN), "W": (IN, OUT), "dy": (TOKENS, OUT)}
AXIS_NAMES = {"x": ("tokens", "in"), "W": ("in", "out"), "dy": ("tokens", "out")}


def draw(ax, name, axis, x0, title):
    """A matrix of `name` at x0, its blocks of BLOCK elements along `axis` shaded."""
    rows, cols = SIZES[name]
    colors = ["#4c72b0", "#dd8452"]
    for r in range(rows):
        for c in range(cols):
            index = r if axis == 0 else c
            other = c if axis == 0 else r
            color = colors[(index // BLOCK + other) % 2]
            ax.add_patch(Rectangle((x0 + c, rows - 1 - r), 1, 1, facecolor=color,
                                   edgecolor="white", linewidth=0.8, alpha=0.85))
    ax.text(x0 + cols / 2, rows + 0.5, title, ha="center", va="bottom", fontsize=9)
    ax.text(x0 + cols / 2, -0.9, f"blocks along {AXIS_NAMES[name][axis]}", ha="center",
            va="top", fontsize=8)
    return x0 + cols + 2.5


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemm_axes.png")):
    spec = GemmAxes("ti,io->to", 2, 2)  # the axes drawn are those the library computes
    gemms = [
        ("forward  y = x W", [("x", spec.forward[0][0], "x"), ("W", spec.forward[1][0], "W")]),
        ("input gradient  dx = dy W^T", [("dy", spec.input_grad[0][0], "dy"),
                                         ("W", spec.input_grad[1][0], "W (again)")]),
        ("weight gradient  dW = x^T dy", [("x", spec.kernel_grad[0][0], "x (again)"),
                                          ("dy", spec.kernel_grad[1][0], "dy (again)")]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (title, operands) in zip(axes, gemms):
        x0 = 0.0
        for name, axis, label in operands:
            x0 = draw(ax, name, axis, x0, label)
        ax.set_xlim(-0.5, x0 - 1.5)
        ax.set_ylim(-2.2, TOKENS + 1.6)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Dense layer, {TOKENS} tokens x {IN} inputs -> {OUT} outputs, blocks of "
                 f"{BLOCK}:\neach GEMM blocks both operands along its own reduction axis "
                 "(one colour run = one block, one shared scale)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
