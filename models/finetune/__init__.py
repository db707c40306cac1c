"""Fine-tuning real pretrained models (EfficientNet-Lite0, MiniLM) to 8 bits.

    .venv/bin/python -m models.finetune --part=minilm --seeds=0,1,2

FP32 fine-tuning, PTQ (+ BatchNorm re-calibration) and fine-tuning in hfp8, fp8,
bfloat16 and int16_dfp, from the same pretrained weights (`tfhfp8.finetune`). Result
tables: `docs/results.md`.
"""
