"""Copies the C++ sources into the package so installed wheels can build the ops."""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        target = pathlib.Path(self.build_lib) / "tfhfp8" / "custom_ops"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree("custom_ops", target)


setup(cmdclass={"build_py": BuildPyWithKernels})
