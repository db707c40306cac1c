"""A griffe extension for `make docs`: the doctest examples of tfhfp8's docstrings
(`>>>` lines, their `...` continuations and the output up to the next blank line) become
fenced `pycon` code blocks, wherever they stand; griffe's Google-style parser recognises
them only under an `Examples:` heading, and Markdown would read `>>>` as quotes."""

import griffe


def fence_doctests(text):
    """`text` with each run of doctest lines wrapped in a ```pycon fence (same indent)."""
    out, in_example, in_fence = [], False, False
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if in_example and not stripped:
            out.append(indent + "```")
            in_example = False
        elif not in_example and not in_fence and stripped.startswith(">>>"):
            indent = line[:len(line) - len(stripped)]
            out.append(indent + "```pycon")
            in_example = True
        out.append(line)
    if in_example:
        out.append(indent + "```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
