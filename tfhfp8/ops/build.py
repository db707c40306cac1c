"""Builds the C++ kernels against the installed TensorFlow, once, and caches them.

A custom-op library only loads into the TensorFlow it was compiled against, so it
is compiled on the user's machine: on first use (or `python -m tfhfp8.ops.build`),
into `$TFHFP8_CACHE_DIR` (default `~/.cache/tfhfp8`), under a name that hashes the
sources, the TensorFlow version and flags, the compiler and the CPU, so a change of
any of them rebuilds it.
"""

import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile

import tensorflow as tf

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
# Installed wheels carry the sources as tfhfp8/custom_ops; a source checkout has them
# at the repository root.
_SOURCE_DIRS = (_PACKAGE / "custom_ops", _PACKAGE.parent / "custom_ops")
_OPTIONS = ["-std=c++17", "-O3", "-fno-trapping-math", "-shared", "-fPIC", "-DNDEBUG"]


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled."""


def source_dir() -> pathlib.Path:
    for path in _SOURCE_DIRS:
        if (path / "quantize").is_dir():
            return path
    raise BuildError(f"C++ sources not found in {[str(p) for p in _SOURCE_DIRS]}")


def _sources():
    root = source_dir()
    files = sorted(root.glob("**/cc/**/*.cc")) + sorted(root.glob("**/cc/**/*.h"))
    return root, files


def _compiler():
    return os.environ.get("CXX", "g++")


def _fingerprint(files, command):
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(command).encode())
    digest.update(tf.__version__.encode())
    digest.update(platform.machine().encode())
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, check=True)
        digest.update(version.stdout)
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(f"no working C++ compiler ({_compiler()}): {error}") from error
    cpuinfo = pathlib.Path("/proc/cpuinfo")  # -march=native: the CPU is an input
    if cpuinfo.exists():
        flags = [l for l in cpuinfo.read_text().splitlines() if l.startswith("flags")]
        digest.update((flags[0] if flags else "").encode())
    return digest.hexdigest()[:16]


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "tfhfp8"
    return pathlib.Path(os.environ.get("TFHFP8_CACHE_DIR", default))


def library_path(verbose=False) -> pathlib.Path:
    """Path of the compiled library, building it first if needed."""
    root, files = _sources()
    kernels = [str(p) for p in files if p.suffix == ".cc"]
    command = ([_compiler()] + _OPTIONS + [f"-I{root / 'quantize' / 'cc' / 'kernels'}"]
               + tf.sysconfig.get_compile_flags() + kernels + tf.sysconfig.get_link_flags())
    target = cache_dir() / f"_tfhfp8_ops_{_fingerprint(files, command)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = pathlib.Path(tmp.name)
    if verbose:
        print("Building tfhfp8 ops:", " ".join(shlex.quote(a) for a in command), file=sys.stderr)
    result = subprocess.run(command + ["-o", str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"compiling the tfhfp8 ops failed:\n{result.stderr[-4000:]}")
    os.replace(partial, target)  # atomic: concurrent builds never load a partial file
    return target


if __name__ == "__main__":
    print(library_path(verbose=True))
