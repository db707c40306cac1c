"""Running an absl program: the `tfhfp8` command, the benchmarks and the experiments."""

import sys

from absl import app


def run(main, argv=None):
    """`absl.app.run(main)`, except that `--help` exits with status 0 (absl's exits 1)."""
    argv = sys.argv if argv is None else argv
    if {"--help", "-h", "--helpshort"} & set(argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main, argv=argv)
