"""The model garden: one folder per study, each run from the repository root as
`python -m models.<study>` (no `sys.path` edits, no `PYTHONPATH`).

- `models.policy_comparison`: FP32 vs BF16 vs FP8 vs HFP8 vs INT16 DFP training of
  ResNet-20, MobileNetV2 and a Transformer (Sun et al. 2019, Table 1 in spirit), and
  the hfp8 ablation; results in `docs/results.md`.
- `models.loss_scaling`: none / fixed / dynamic / enhanced / adaptive loss scaling
  under fp8 and hfp8 (Mellempudi et al. 2019, Zhao et al. 2019); `docs/loss_scaling.md`.
- `models.ptq`: post-training quantization with BatchNorm re-calibration of trained
  and pretrained models (Sun et al. 2019, section 4), and the EfficientNet-Lite0 port;
  `docs/ptq.md`.
- `models.tfmot_comparison`: tensorflow-model-optimization's default int8 QAT vs hfp8
  QAT through `tfhfp8.tfmot` on one tf-keras CNN; `docs/results.md`.

The reference model builders themselves are `tfhfp8.models`.
"""

import os
import pathlib
import platform


def cpu_name():
    """This machine's CPU as /proc/cpuinfo names it, and its core count (results name
    the CPU they were measured on)."""
    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
