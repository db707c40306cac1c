"""The README's first Python example runs as written."""

import pathlib
import re

import keras

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_example_runs(capsys):
    keras.utils.set_random_seed(0)
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "[ 1.         0.1015625 30.       ]" in printed[0]
    loss, accuracy = eval(printed[-1])
    assert accuracy > 0.9, printed[-1]
