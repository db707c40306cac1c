"""What a benchmark ran on: the CPU, the library versions and the load average."""

import os
import pathlib
import platform

import keras
import ml_dtypes
import numpy as np
import tensorflow as tf


def describe():
    """Two lines: the CPU and its usable cores; TensorFlow, Keras, ml_dtypes, NumPy."""
    model, cores = "unknown", os.cpu_count()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return (f"CPU: {model} ({platform.machine()}), {cores} cores ({usable} usable)\n"
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"ml_dtypes {ml_dtypes.__version__}, NumPy {np.__version__}, intra-op threads "
            f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")


def load_average():
    """The 1, 5 and 15 minute load averages, as printed by uptime."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"
