"""Shared test fixtures (keep this minimal: other test files rely on it)."""

import os

import pytest

# (The helpers next to the tests, e.g. reference.py, import as top-level modules:
# setup.cfg's `pythonpath = tests`.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKENDS = ("tf", "cpp")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend of tfhfp8.quantize (TFHFP8_BACKEND is read per call)."""
    monkeypatch.setenv("TFHFP8_BACKEND", request.param)
    return request.param


@pytest.fixture
def command_in_process(capfd, monkeypatch):
    """`command_in_process("train", "--epochs=0")` runs `tfhfp8 train --epochs=0` in this
    process (absl flags re-parsed from their defaults) and returns a
    `subprocess.CompletedProcess`. For the checks that end before any work is done: each
    then costs no new interpreter (about 10 s of TensorFlow import on a 2-core CPU). An
    exception that escapes the command fails the test, as a traceback would."""
    import subprocess
    import sys

    from absl import flags

    from tfhfp8 import cli

    monkeypatch.setattr(sys.modules["__main__"], "__doc__", None)  # cli.run sets it

    def run(*args):
        argv = ["tfhfp8", *args]
        monkeypatch.setattr(sys, "argv", argv)
        flags.FLAGS.unparse_flags()
        capfd.readouterr()
        message = ""
        try:
            cli.run()
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
            if not isinstance(code, int):  # sys.exit("text"): Python prints it, status 1
                message, code = f"{code}\n", 1
        finally:
            flags.FLAGS.unparse_flags()
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err + message)

    return run
