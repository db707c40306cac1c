"""Every code block of the README and of the documentation pages (docs/**/*.md) runs.

One test per fenced block. The blocks of one page share one namespace and run in page
order: a test first runs the blocks before its own that this process has not run yet
(so the tests also pass when pytest-xdist spreads a page over several workers).

- `python` blocks run in this process.
- `bash` blocks run in bash from the repository root, with this interpreter's `bin/`
  first on PATH and the repository first on PYTHONPATH (so `tfhfp8` is this checkout).
- `text`, `console` and `pycon` blocks are records (output, a transcript), never run.
- A block right after an HTML comment `<!-- not run: why -->` is not run (a long
  training command, a second machine); the reason is the test's skip message.
- A fence without a language fails: say what the block is.

Some blocks print what a comment beside them claims: `OUTPUT_CHECKS` checks that output.
"""

import os
import pathlib
import re
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = {"python", "bash"}
RECORDS = {"text", "console", "pycon"}
FENCE = re.compile(r"^( *)```(.*)$")
NOT_RUN = re.compile(r"^\s*<!-- not run: (.+?) -->\s*$")


class Block:
    def __init__(self, page, index, line, language, code, not_run):
        self.page, self.index, self.line = page, index, line
        self.language, self.code, self.not_run = language, code, not_run

    @property
    def id(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page):
    """The fenced code blocks of `page`, in order."""
    lines = page.read_text().split("\n")
    found, start = [], None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if not match:
            continue
        if start is None:
            start, indent, language = number, match.group(1), match.group(2).strip()
            before = [text for text in lines[:number - 1] if text.strip()]
            reason = NOT_RUN.match(before[-1]) if before else None
        elif match.group(2).strip() == "" and len(match.group(1)) <= len(indent):
            body = [text[len(indent):] for text in lines[start:number - 1]]
            found.append(Block(page, len(found), start, language, "\n".join(body),
                               reason.group(1) if reason else None))
            start = None
    assert start is None, f"{page}:{start}: the code block is never closed"
    return found


def _readme_example(printed):
    """The README's example: the rounded values it shows, and a model that learned."""
    assert "[ 1.         0.1015625 30.       ]" in printed[0]
    loss, accuracy = eval(printed[-1])
    assert accuracy > 0.9, printed[-1]


def _p3109_block_example(printed):
    """docs/block_formats.md's P3109 elements and scales: the values its comments give."""
    assert printed == ["[[0.875, 0.0, 2.625, 10.5]]", "[[0.8125, -0.8125, 3.25, 9.75]]"]


# (page, number of python blocks before it on the page) -> a check of what it printed.
OUTPUT_CHECKS = {("README.md", 0): _readme_example,
                 ("docs/block_formats.md", 2): _p3109_block_example}

ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
_namespaces = {}   # page -> [namespace, index of the next block to run]


def _run(block):
    if block.language == "python":
        namespace = _namespaces[block.page][0]
        exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
    elif block.language == "bash":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (
            f"{block.id} exited with {result.returncode}:\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda block: block.id)
def test_code_block_runs(block, capsys):
    assert block.language in RUN | RECORDS, (
        f"{block.id}: a code block in {block.language or 'no language'}; "
        f"name one of {sorted(RUN | RECORDS)}")
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    if block.language in RECORDS:
        return
    if block.page not in _namespaces:
        keras.utils.set_random_seed(0)
        _namespaces[block.page] = [{"__name__": "__main__"}, 0]
    state = _namespaces[block.page]
    page_blocks = blocks(block.page)
    while state[1] < block.index:   # the earlier blocks of the page, once per process
        earlier = page_blocks[state[1]]
        state[1] += 1
        if earlier.language in RUN and not earlier.not_run:
            try:
                _run(earlier)
            except Exception as error:
                raise AssertionError(f"{earlier.id}, which {block.id} builds on, "
                                     f"failed: {error!r}") from error
    if state[1] == block.index:
        state[1] += 1
        capsys.readouterr()
        _run(block)
        python_index = sum(b.language == "python" for b in page_blocks[:block.index])
        check = block.language == "python" and OUTPUT_CHECKS.get(
            (str(block.page.relative_to(ROOT)), python_index))
        if check:
            check(capsys.readouterr().out.splitlines())
