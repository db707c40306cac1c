"""Loss scaling for 8-bit errors: none, fixed, dynamic, enhanced dynamic, adaptive.

Reproduces the loss-scaling question of Mellempudi et al. 2019 (enhanced dynamic
scaling with a floor) and Zhao et al. 2019 (adaptive per-layer scaling) on a CNN
trained on Fashion-MNIST under the fp8 and hfp8 policies.

    .venv/bin/python -m models.loss_scaling --json docs/loss_scaling_results.json \
        --plot docs/loss_scaling.png

Result table: `docs/loss_scaling.md`.
"""
