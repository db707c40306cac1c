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
