r"""Today's recipes on a Transformer: does it train with DeepSeek-V3's FP8 (as Transformer
Engine's Float8BlockScaling quantizes it) and with MXFP8 as cuBLAS scales it?

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 python -m models.recipes \
        --seeds=0,1,2 --output_root=docs/results/recipes
    python -m models.recipes --table --output_root=docs/results/recipes

The model, data and flags of `models.tensor_cores.training` (`tfhfp8 train`'s
`transformer_classifier` on the first `--limit` Rotten Tomatoes reviews, every test
review, no loss scaling, the same initial weights and data order per seed), under:

- `bfloat16`: every GEMM operand in BF16 (the baseline of the recipes' papers);
- `fp8_delayed`: E4M3 / E5M2 with per-tensor delayed scaling (TE's DelayedScaling);
- `deepseek_v3_fp8`: E4M3 everywhere, FP32 scales per 1 x 128 block and 128 x 128
  weight tile, the first and last GEMM layers and attention products in FP32;
- `mxfp8`: OCP MXFP8 (E4M3 forward, E5M2 errors, E8M0 scales rounded down);
- `mxfp8_cublas`: TE's MXFP8BlockScaling (E4M3 everywhere, scales rounded up, "RCEIL").

Every GEMM sums in FP32 here.
"""

import functools

from absl import app

import tfhfp8
from models.tensor_cores import training


def policies():
    """The compared policies, by name."""
    return {name: tfhfp8.Policy(name) for name in (
        "bfloat16", "fp8_delayed", "deepseek_v3_fp8", "mxfp8", "mxfp8_cublas")}


if __name__ == "__main__":
    app.run(functools.partial(training.main, compared=policies))
