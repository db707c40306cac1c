"""The Colab tutorials in colab/ run top to bottom, on a CPU, in a kernel of this interpreter.

Each notebook is executed with nbclient in a temporary working directory, with the
repository first on PYTHONPATH (so the notebooks' install cells find tfhfp8 and install
nothing) and matplotlib's inline backend (no display needed). Any error in a cell fails
the test; each notebook's wall time is printed and recorded (see `pytest --durations`).
"""

import json
import os
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = sorted(name for name in os.listdir(COLAB) if name.endswith(".ipynb"))
EXPECTED = (
    "01_precision_policies.ipynb",
    "02_fine_tune_pretrained_to_8bit.ipynb",
    "03_loss_scaling.ipynb",
    "04_custom_formats.ipynb",
    "05_finetune_pretrained_to_8bit.ipynb",
    "06_export_to_onnx.ipynb",
)
CELL_TIMEOUT = 600  # seconds per cell
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/tfhfp8/tfhfp8/blob/main/colab/{})")


def _read(name):
    return nbformat.read(os.path.join(COLAB, name), as_version=4)


def test_all_tutorials_are_present():
    assert set(EXPECTED) <= set(NOTEBOOKS), sorted(set(EXPECTED) - set(NOTEBOOKS))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    """Valid, outputs cleared, a markdown introduction, then a guarded install cell."""
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    intro, install = nb.cells[0], nb.cells[1]
    assert intro.cell_type == "markdown" and intro.source.startswith("# ")
    assert BADGE.format(name) in intro.source
    assert install.cell_type == "code"
    assert 'find_spec("tfhfp8") is None' in install.source
    assert "git+https://github.com/tfhfp8/tfhfp8" in install.source
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}: cell {index} has outputs; clear them before committing")


def test_readme_links_every_notebook():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in NOTEBOOKS:
        assert BADGE.format(name) in readme, name


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A "python3" kernelspec that runs this very interpreter (the venv's ipykernel)."""
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / "python3").mkdir()
    (kernels / "python3" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tfhfp8 tests)",
        "language": "python",
    }))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def _kernel_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # no display needed
    env.pop("DISPLAY", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _cell_seconds(cell):
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    from datetime import datetime

    parse = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (parse(end) - parse(start)).total_seconds()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, kernel_spec_manager, record_property):
    nb = _read(name)
    # One extra cell checks that the kernel runs this interpreter.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute(cwd=str(tmp_path), env=_kernel_env(), cleanup_kc=True)
    finally:
        seconds = time.perf_counter() - start
        record_property("notebook_seconds", round(seconds, 1))
        cells = [(t, i) for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (t := _cell_seconds(c)) is not None]
        slowest = ", ".join(f"cell {i}: {t:.1f} s" for t, i in sorted(cells, reverse=True)[:3])
        print(f"\n{name}: {seconds:.1f} s wall time (slowest: {slowest})")
    printed = "".join(output.get("text", "") for output in nb.cells[-1].outputs)
    assert printed.strip() == sys.prefix, (printed, sys.prefix)
    # The install cell found tfhfp8 and the data packages: nothing was installed.
    assert not any(output.get("name") == "stderr" and "pip" in output.get("text", "")
                   for output in nb.cells[1].outputs), nb.cells[1].outputs
