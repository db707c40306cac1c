"""Does it still train? FP32, BF16, FP8, HFP8 and INT16 DFP on the same model.

Reproduces the comparison of Sun et al. 2019 (HFP8 vs FP8 vs FP32), Kalamkar et al.
2019 (BF16) and Das et al. 2018 (INT16 DFP) at CPU scale: ResNet-20 and MobileNetV2 on
Fashion-MNIST, a Transformer on Rotten Tomatoes, three seeds.

    PATH=.venv/bin:$PATH models/policy_comparison/run.sh results   # the runs (~3 h)
    .venv/bin/python -m models.policy_comparison --root=results    # the tables
    .venv/bin/python -m models.policy_comparison.hfp8_ablation     # one change at a time

Result tables: `docs/results.md` (from the runs kept in `docs/results/`).
"""
