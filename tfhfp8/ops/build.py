"""Builds the C++ kernels against the installed TensorFlow, once, and caches them.

A custom-op library only loads into the TensorFlow it was compiled against, so it
is compiled on the user's machine: on first use (or `python -m tfhfp8.ops.build`),
into `$TFHFP8_CACHE_DIR` (default `~/.cache/tfhfp8`), under a name that hashes the
sources, the TensorFlow version and flags and the compiler, so a change of any of
them rebuilds it. Each object file is cached too (checksummed, under a hash of what it
depends on): a library damaged later is relinked, not recompiled, and the loops, which
use no TensorFlow header, are compiled once for every TensorFlow version.

The library runs on every CPU of its architecture: TensorFlow's headers are compiled
for the baseline instruction set only, and the quantization loops once per CPU
variant (`VARIANTS`; the sources in `LOOPS`), the best of which the kernels pick at run time
(`custom_ops/quantize/cc/kernels/cpu_dispatch.h`). Nothing is built with
`-march=native`.
"""

import concurrent.futures
import hashlib
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
# Installed wheels carry the sources as tfhfp8/custom_ops; a source checkout has them
# at the repository root.
_SOURCE_DIRS = (_PACKAGE / "custom_ops", _PACKAGE.parent / "custom_ops")
# -ffp-contract=off: a multiply followed by an add must round twice (the emulated
# accumulations depend on it), never be fused into one FMA.
_OPTIONS = ["-std=c++17", "-O3", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-DNDEBUG"]
_KERNEL_DIRS = [pathlib.Path(area, "cc", "kernels") for area in ("quantize", "accumulate")]
# Compiled once per variant, without TF headers.
LOOPS = [pathlib.Path("quantize", "cc", "kernels", "quantize_loops.cc"),
         pathlib.Path("accumulate", "cc", "kernels", "accumulate_loops.cc"),
         pathlib.Path("accumulate", "cc", "kernels", "fused_loops.cc")]

# x86-64 feature levels (as in the psABI), spelt as feature flags, which older
# compilers know too; the run-time checks in cpu_dispatch.cc test the same features.
_X86_64_V3 = ["-msse4.2", "-mpopcnt", "-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c",
              "-mlzcnt", "-mmovbe"]
_X86_64_V4 = _X86_64_V3 + ["-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq",
                           "-mavx512vl", "-mprefer-vector-width=512"]
# (name, flags): the CPU variants of the loops built on each architecture.
VARIANTS = {
    "x86_64": [("baseline", []), ("x86_64_v3", _X86_64_V3), ("x86_64_v4", _X86_64_V4)],
}


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled."""


def source_dir() -> pathlib.Path:
    for path in _SOURCE_DIRS:
        if (path / "quantize").is_dir():
            return path
    raise BuildError(f"C++ sources not found in {[str(p) for p in _SOURCE_DIRS]}")


def variants(machine=None):
    """The (name, compiler flags) of the loop variants built for `machine`."""
    return VARIANTS.get(machine or platform.machine(), [("baseline", [])])


def compiler():
    return os.environ.get("CXX", "g++")


def _includes():
    return [f"-I{source_dir() / d}" for d in _KERNEL_DIRS]


def loops_command(variant, flags, output, cxx=None, source=LOOPS[0]):
    """The command that compiles one variant of the loops in `source` (one of `LOOPS`)
    to an object file."""
    return ([cxx or compiler()] + _OPTIONS + flags + [f"-DTFHFP8_VARIANT={variant}"]
            + _includes() + ["-c", str(source_dir() / source), "-o", str(output)])


def _commands(workdir):
    """The compile commands (one per object), the link command, and the number of
    leading compile commands that use no TensorFlow header (the loops)."""
    root = source_dir()
    compile_flags = tf.sysconfig.get_compile_flags()
    objects, commands = [], []
    for loops in LOOPS:
        for name, flags in variants():
            objects.append(workdir / f"{loops.stem}_{name}.o")
            commands.append(loops_command(name, flags, objects[-1], source=loops))
    tf_free = len(commands)
    loop_names = {loops.name for loops in LOOPS}
    for source in sorted(root.glob("**/cc/**/*.cc")):
        if source.name in loop_names:
            continue
        objects.append(workdir / f"{source.stem}.o")
        commands.append([compiler()] + _OPTIONS + _includes() + compile_flags
                        + ["-c", str(source), "-o", str(objects[-1])])
    link = ([compiler(), "-shared", "-fPIC"] + [str(o) for o in objects]
            + tf.sysconfig.get_link_flags())
    return commands, link, tf_free


def base_digest():
    """A hash of what every object file and the library depend on: the sources, the
    machine and the compiler (taken once per build, see `_digest`)."""
    root = source_dir()
    digest = hashlib.sha256()
    for path in sorted(root.glob("**/cc/**/*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    digest.update(platform.machine().encode())
    try:
        version = subprocess.run([compiler(), "--version"], capture_output=True, check=True)
        digest.update(version.stdout)
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(f"no working C++ compiler ({compiler()}): {error}") from error
    return digest.digest()


def _digest(base, commands, with_tensorflow):
    """`base` (see `base_digest`) with `commands` (and TensorFlow's version when
    `with_tensorflow`). The commands are hashed without the folders they write to and
    read from (the sources' contents and TensorFlow's version stand for them), so that a
    fresh clone or virtual environment reuses what an identical one built."""
    digest = hashlib.sha256(base)
    folders = sorted({str(source_dir()), tf.sysconfig.get_include(), tf.sysconfig.get_lib()},
                     key=len, reverse=True)
    for command in commands:
        text = " ".join(a for a in command if not a.endswith(".o") and a != "-o")
        for index, folder in enumerate(folders):
            text = text.replace(folder, f"<folder {index}>")
        digest.update(text.encode())
    if with_tensorflow:
        digest.update(tf.__version__.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "tfhfp8"
    return pathlib.Path(os.environ.get("TFHFP8_CACHE_DIR", default))


def _checksum(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_intact(target):
    """True if `target` is the complete file its build wrote (see `_checksum`)."""
    sidecar = target.with_suffix(".sha256")
    try:
        return sidecar.read_text().strip() == _checksum(target)
    except OSError:
        return False


def first_errors(output, limit=12):
    """The compiler's first `error:` lines (and the linker's), not its warnings."""
    pattern = re.compile(r"\berror\b|undefined reference|cannot find|fatal", re.IGNORECASE)
    lines = [line for line in output.splitlines() if pattern.search(line)]
    return "\n".join(lines[:limit]) or output[-2000:]


def _run(command, log):
    result = subprocess.run(command, capture_output=True, text=True)
    log.append("$ " + " ".join(shlex.quote(a) for a in command) + "\n" + result.stderr)
    if result.returncode != 0:
        return command, result.stderr
    return None


def _publish(source, target):
    """Copies `source` to `target` atomically, its checksum beside it (see `_is_intact`):
    a concurrent build or load never sees a partial file, and a file damaged later is
    rebuilt."""
    staged = pathlib.Path(tempfile.mkstemp(dir=target.parent, suffix=target.suffix)[1])
    staged.write_bytes(source.read_bytes())
    staged.chmod(0o644)  # mkstemp's 0600 would hide it from a cache shared by users
    checksum = _checksum(staged)
    os.replace(staged, target)
    sidecar = pathlib.Path(tempfile.mkstemp(dir=target.parent, suffix=".sha256")[1])
    sidecar.write_text(checksum + "\n")
    sidecar.chmod(0o644)
    os.replace(sidecar, target.with_suffix(".sha256"))


def cached_object(base, command, with_tensorflow):
    """Where the object file `command` compiles is cached (`base`: see `base_digest`)."""
    return cache_dir() / "objects" / f"{_digest(base, [command], with_tensorflow)}.o"


def _compile(base, commands, tf_free, link, library, target):
    """Compiles what is not cached intact (and caches it) and links into `library`."""
    log, missing = [], []
    for index, command in enumerate(commands):
        obj, cached = pathlib.Path(command[-1]), cached_object(base, command, index >= tf_free)
        if _is_intact(cached):
            shutil.copyfile(cached, obj)
        else:
            missing.append((command, cached))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(lambda c: _run(c[0], log), missing) if f]
    if not failures:
        for command, cached in missing:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _publish(pathlib.Path(command[-1]), cached)
        failures = [f for f in [_run(link + ["-o", str(library)], log)] if f]
    if failures:
        log_path = target.with_suffix(".log")
        log_path.write_text("\n".join(log))
        command, stderr = failures[0]
        raise BuildError(
            f"compiling the tfhfp8 ops failed ({len(failures)} of {len(commands) + 1} "
            f"steps); first errors:\n{first_errors(stderr)}\n"
            f"failed command: {' '.join(shlex.quote(a) for a in command)}\n"
            f"full log: {log_path}")


def library_path(verbose=False) -> pathlib.Path:
    """Path of the compiled library, building it first if needed; raises BuildError."""
    target_dir = cache_dir()
    with tempfile.TemporaryDirectory(prefix="tfhfp8-build-") as tmp:
        commands, link, tf_free = _commands(pathlib.Path(tmp))
        base = base_digest()
        target = target_dir / f"_tfhfp8_ops_{_digest(base, commands + [link], True)}.so"
        if target.exists() and _is_intact(target):
            return target
        target_dir.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"Building tfhfp8 ops into {target}", file=sys.stderr)
        partial = pathlib.Path(tmp) / "library.so"
        _compile(base, commands, tf_free, link, partial, target)
        _publish(partial, target)
    return target


if __name__ == "__main__":
    try:
        print(library_path(verbose=True))
    except BuildError as error:
        sys.exit(f"tfhfp8: {error}")
