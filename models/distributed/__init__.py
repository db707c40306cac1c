"""Gradients communicated in low precision: FP32, FP16, BF16, 1-5-2, 1-5-2 with scaling.

ResNet-20 trained on Fashion-MNIST in HFP8 (1-4-3 forward, 1-5-2 backward, adaptive
per-layer loss scaling) with 4 data-parallel replicas (`tf.distribute.MirroredStrategy`
on logical CPU devices), the gradient all-reduce emulated in each communication format
(`tfhfp8.distribute`: a ring, every partial sum rounded).

    .venv/bin/python -m models.distributed --json docs/results/distributed_communication.json

Result table: `docs/results.md` (section "Gradient communication").
"""
