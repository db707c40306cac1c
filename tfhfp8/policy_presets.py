"""The built-in policies (`tfhfp8.Policy(name)`), each with the sources it follows.

A preset is the keyword arguments of `tfhfp8.Policy` it stands for; `tfhfp8.policy`
builds and checks them.
"""

PRESETS = {
    # No emulation.
    "float32": dict(),
    # Kalamkar et al. 2019 ("A Study of BFLOAT16 for Deep Learning Training"): the GEMM
    # inputs (weights, activations, errors) in BF16 with round-to-nearest-even; FP32
    # accumulation, weight gradients (a GEMM output), master weights and optimizer state;
    # no layer exempted; no loss scaling (BF16 has FP32's range).
    "bfloat16": dict(weights="bfloat16", activations="bfloat16", errors="bfloat16"),
    # Mellempudi et al. 2019 ("Mixed Precision Training With 8-bit Floating Point"), on
    # Wang et al. 2018: 1-5-2 for weights, activations, errors and weight gradients;
    # round-to-nearest forward, stochastic rounding of the backward tensors; FP16 master
    # weights updated with stochastic rounding; first and last GEMM layers kept out of 8
    # bits (here FP16). Their "enhanced loss scaling" is global, an optimizer's business:
    # `tfhfp8.loss_scaling.DynamicLossScaleOptimizer(..., min_scale=...)` (`tfhfp8 train
    # --loss_scaling=enhanced`). Wang et al. keep momentum in 1-6-9 with stochastic
    # rounding: `Policy("fp8", optimizer_states="float16_e6m9", rounding=...)` with
    # `tfhfp8.optimizers.LowPrecision`.
    "fp8": dict(
        weights="float8_e5m2", activations="float8_e5m2", errors="float8_e5m2",
        weight_gradients="float8_e5m2", master_weights="float16",
        rounding=dict(errors="stochastic", weight_gradients="stochastic",
                      master_weights="stochastic"),
        exempt_first_last=True),
    # Sun et al. 2019 (HFP8), as Rodriguez (Deep Learning Systems, ch. 6) summarises it:
    # "a hybrid (1,4,3) and (1,5,2) approach for the forward and backpropagation,
    # respectively, using loss-scaling and stochastic rounding, and keeping the input
    # and last layers at fp16". Here: 1-4-3 (bias 11) weights and activations with
    # round-to-nearest (Sun et al.); 1-5-2 errors with stochastic rounding (Rodriguez;
    # as Mellempudi et al. round the backward tensors); weight gradients and master
    # weights in FP16 (Sun et al.), the update `W <- Q(W + dW)` rounded stochastically
    # (Wang et al. 2018, the FP8 work HFP8 extends: with round-to-nearest an FP16 weight
    # of 1.0 loses every update below 2^-11); first and last GEMM layers in FP16
    # (Rodriguez, Sun et al.). The stochastic-rounding counters are saved in .keras and
    # .weights.h5 files and tracked by tf.train.Checkpoint, so resumed runs round as
    # uninterrupted ones. Loss scaling, whose kind the sources at hand do not state, is
    # the training's: `tfhfp8 train` adds per-layer adaptive scaling by default,
    # `Policy("hfp8", loss_scaling="adaptive")` by hand (in the preset, files saved under
    # the name "hfp8" would lack its state). The ablation behind these choices:
    # docs/results.md, "The HFP8 recipe".
    "hfp8": dict(
        weights="float8_e4m3b11fnuz", activations="float8_e4m3b11fnuz",
        errors="float8_e5m2", weight_gradients="float16", master_weights="float16",
        rounding=dict(errors="stochastic", master_weights="stochastic"),
        exempt_first_last=True),
    # Das et al. 2018: INT16 dynamic fixed point (one shared exponent per tensor) for
    # the GEMM inputs, FP32 accumulation, weight gradients and master weights.
    "int16_dfp": dict(weights="int16_dfp", activations="int16_dfp", errors="int16_dfp"),
    # NVIDIA Transformer Engine's DelayedScaling (HYBRID) and Keras 3's float8 training
    # (`layer.quantize("float8")`): E4M3 weights and activations, E5M2 errors, each
    # with a per-tensor FP32 scale from a 1024-step amax history, margin 0; FP32 weight
    # gradients and master weights; no layer exempt (Keras quantizes every Dense and
    # EinsumDense).
    "fp8_delayed": dict(weights="e4m3_delayed", activations="e4m3_delayed",
                        errors="e5m2_delayed"),
    # `fp8_delayed` on an H100 as Transformer Engine runs it: the forward GEMM with
    # cuBLAS' fast FP8 accumulation (the wgmma's own 13-bit sums, `nvidia_hopper_fp8`);
    # dgrad and wgrad with split accumulation (TE's `_2X_ACC_DGRAD`, `_2X_ACC_WGRAD`:
    # the partial sums promoted to FP32). cuBLAS does not document the promotion
    # interval; it is emulated with the one documented, DeepSeek-V3's 128
    # (`nvidia_hopper_fp8_promote128`). The GEMMs multiply the FP8 data and apply the
    # two FP32 scales after the sum (`tfhfp8.gemm.TensorScaled`).
    "fp8_hopper": dict(weights="e4m3_delayed", activations="e4m3_delayed",
                       errors="e5m2_delayed",
                       accumulation=dict(forward="nvidia_hopper_fp8",
                                         input_gradient="nvidia_hopper_fp8_promote128",
                                         weight_gradient="nvidia_hopper_fp8_promote128")),
    # The same with the promotion every 128 products in all three GEMMs, as DeepSeek-V3
    # promotes (arXiv 2412.19437, section 3.3.2; its per-tile scales: not here).
    "fp8_hopper_promoted": dict(weights="e4m3_delayed", activations="e4m3_delayed",
                                errors="e5m2_delayed",
                                accumulation="nvidia_hopper_fp8_promote128"),
    # DeepSeek-V3 (arXiv 2412.19437, section 3.3), as Transformer Engine's
    # Float8BlockScaling quantizes it with FP32 scales: E4M3 for every operand of the
    # forward, dgrad and wgrad GEMMs; activations and output gradients in 1 x 128 tiles
    # along each GEMM's reduction axis, weights in 128 x 128 tiles quantized once for
    # the forward and dgrad GEMMs; FP32 scales from the current amax (TE's reference
    # arithmetic, `tfhfp8.BlockScaled`); master weights and weight gradients FP32;
    # optimizer moments in BF16 (with `tfhfp8.optimizers.LowPrecision`); attention
    # products in high precision; the output head (and, as tfhfp8 exempts first and
    # last together, the first GEMM layer) in FP32; embeddings and normalization are
    # not quantized by `quantize_model`. Not emulated yet: DeepSeek's promotion of the
    # tensor cores' partial sums with the tiles' scales applied at each promotion (the
    # GEMMs sum in FP32 here).
    "deepseek_v3_fp8": dict(weights="e4m3_128x128", activations="e4m3_1x128",
                            errors="e4m3_1x128", optimizer_states="bfloat16",
                            exempt_first_last=True, exempt_format=None,
                            quantize_attention=False),
    # OCP MX (Rouhani et al. 2023, "Microscaling data formats for deep learning", §6):
    # every GEMM operand of the forward and both backward GEMMs in an MX format, each
    # blocked along that GEMM's reduction axis (blocks of 32, E8M0 scales, nearest
    # rounding); weight gradients, weight update, master weights and the non-GEMM ops
    # (softmax, normalization, activations) in FP32; no layer exempt ("no modifications
    # to the training recipe"). MXFP8: E4M3 forward, E5M2 backward.
    "mxfp8": dict(weights="mxfp8_e4m3", activations="mxfp8_e4m3", errors="mxfp8_e5m2"),
    # MXFP8 as Transformer Engine's MXFP8BlockScaling quantizes it for cuBLAS on Blackwell:
    # E4M3 for every operand (its default Format.E4M3), E8M0 scales rounded up ("RCEIL",
    # TE's float_to_e8m0 of amax * fl32(1/448)), each GEMM's operands quantized from the
    # high-precision tensor along that GEMM's reduction axis (TE's rowwise and columnwise
    # copies); FP32 sums, weight gradients and master weights; nothing exempt.
    "mxfp8_cublas": dict(weights="mxfp8_e4m3_rceil", activations="mxfp8_e4m3_rceil",
                         errors="mxfp8_e4m3_rceil"),
    # MXFP6: E3M2 for weights, activations and errors, the paper's sub-8-bit
    # generative-training result.
    "mxfp6": dict(weights="mxfp6_e3m2", activations="mxfp6_e3m2", errors="mxfp6_e3m2"),
    # MXFP4: the paper trains with MXFP4 weights and MXFP6 (E3M2) activations and
    # errors; FP4 for every operand is not one of its recipes.
    "mxfp4": dict(weights="mxfp4_e2m1", activations="mxfp6_e3m2", errors="mxfp6_e3m2"),
    # NVIDIA, "Pretraining large language models with NVFP4" (2025): NVFP4 (E2M1 in
    # blocks of 16, E4M3 block scales, FP32 tensor scale) for the GEMM operands of the
    # linear layers; round to nearest even for weights and activations, stochastic
    # rounding for the gradients (errors); the last layers kept in higher precision
    # (here the first and last GEMM layers, in BF16); the attention products
    # (QK^T, scores x V) in high precision; FP32 weight gradients, master weights and
    # optimizer. Not emulated: the 16x16 two-dimensional weight blocks and the random
    # Hadamard transform of the weight-gradient GEMM's inputs.
    "nvfp4": dict(weights="nvfp4", activations="nvfp4", errors="nvfp4",
                  rounding=dict(errors="stochastic"), exempt_first_last=True,
                  exempt_format="bfloat16", quantize_attention=False),
}
