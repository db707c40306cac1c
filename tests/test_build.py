"""The C++ build: portable to every CPU, dispatched at run time, robust to failures.

The per-element loops are compiled once per CPU variant (tfhfp8.ops.build.VARIANTS)
and chosen at run time; TensorFlow's headers are compiled for the baseline only.
"""

import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8.ops import build

from helpers import assert_same_bits

REPO = pathlib.Path(__file__).resolve().parent.parent
# Beyond the variants the build itself compiles on this machine (baseline, x86-64-v3 and
# x86-64-v4 features on x86-64: the library would not load otherwise), the loops must
# compile for the CPUs whose compilers enable more by -march (AVX-512 FP16 and BF16 on
# Sapphire Rapids, Zen 4's AVX-512 set).
MARCHES = ["sapphirerapids", "znver4"]


def _targets(compiler, flag):
    """True if `compiler` accepts the target flag (so a failure below is ours)."""
    if shutil.which(compiler) is None:
        return False
    probe = subprocess.run([compiler, flag, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                           capture_output=True)
    return probe.returncode == 0


def _compile_loops(tmp_path, flags, compiler=None):
    """Compiles every loop source (all roundings, both containers) with `flags`; compile
    only."""
    for source in build.LOOPS:
        output = tmp_path / f"{source.stem}.o"
        command = build.loops_command("probe", flags, output, cxx=compiler, source=source)
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, build.first_errors(result.stderr)
        assert output.stat().st_size > 0


@pytest.mark.parametrize("march", MARCHES)
def test_loops_compile_for_every_x86_64_level(march, tmp_path):
    if not _targets(build.compiler(), f"-march={march}"):
        pytest.skip(f"{build.compiler()} cannot target -march={march}")
    _compile_loops(tmp_path, [f"-march={march}"])


def test_loops_compile_for_aarch64(tmp_path):
    cross = "aarch64-linux-gnu-g++"
    if platform.machine() == "aarch64":
        cross = build.compiler()
    if shutil.which(cross) is None:
        pytest.skip(f"no aarch64 compiler ({cross}) installed")
    _compile_loops(tmp_path, [], compiler=cross)


def test_backend_info_reports_the_cpu_variant():
    info = tfhfp8.ops.backend_info()
    assert info["backend"] == "cpp"
    names = [name for name, _ in build.variants()]
    assert info["cpu_variant"] in names
    assert set(info["cpu_variants_supported"]) <= set(names)
    assert "baseline" in info["cpu_variants_supported"]
    # The best supported variant runs by default.
    best = [n for n in reversed(names) if n in info["cpu_variants_supported"]][0]
    assert info["cpu_variant"] == best


def _inputs(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(50_000) * np.exp2(rng.integers(-30, 30, 50_000))).astype(dtype)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-45, 3e38], dtype)
    return np.concatenate([x, specials])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_supported_variant_gives_the_same_bits(dtype, monkeypatch):
    x = tf.constant(_inputs(dtype))
    cases = [(fmt, rounding) for fmt in ["hfp8_fwd", "float8_e5m2", "bfloat16", "int16_dfp"]
             for rounding in ["nearest_even", "stochastic", "toward_zero"]]
    monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
    monkeypatch.setenv("TFHFP8_CPU_VARIANT", "baseline")
    expected = [tfhfp8.quantize(x, f, rounding=r, seed=5).numpy() for f, r in cases]
    for variant in tfhfp8.ops.backend_info()["cpu_variants_supported"]:
        monkeypatch.setenv("TFHFP8_CPU_VARIANT", variant)
        assert tfhfp8.ops.backend_info()["cpu_variant"] == variant
        for (f, r), want in zip(cases, expected):
            got = tfhfp8.quantize(x, f, rounding=r, seed=5).numpy()
            assert_same_bits(got, want, x.numpy(), f"{variant} {f} {r}")


def test_unknown_cpu_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
    monkeypatch.setenv("TFHFP8_CPU_VARIANT", "pentium")
    with pytest.raises(tf.errors.InvalidArgumentError, match="TFHFP8_CPU_VARIANT must be"):
        tfhfp8.quantize(tf.ones([3]), "hfp8_fwd")


def _python(code, env=None, **kwargs):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, **kwargs)


def test_compiler_errors_are_shown_not_the_tail_of_the_warnings(tmp_path):
    # A compiler that prints many warnings, then one error, then more warnings.
    fake = tmp_path / "fake-g++"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$*" in *--version*) echo "fake 1.0"; exit 0;; esac
        for i in $(seq 200); do echo "x.h:$i: warning: something is deprecated" >&2; done
        echo "PacketMathFP16.h:740:1: error: expected initializer before '<' token" >&2
        for i in $(seq 200); do echo "y.h:$i: warning: more deprecation" >&2; done
        exit 1
        """))
    fake.chmod(0o755)
    env = {"CXX": str(fake), "TFHFP8_CACHE_DIR": str(tmp_path / "cache"),
           "TFHFP8_BACKEND": ""}
    result = subprocess.run([sys.executable, "-m", "tfhfp8.ops.build"], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, **env})
    assert result.returncode != 0  # make test must fail loudly on a broken build
    assert "error: expected initializer before '<' token" in result.stderr
    assert "full log:" in result.stderr
    # The library falls back to the TF-ops backend with one warning, same results.
    result = _python("""
        import warnings
        import tensorflow as tf, tfhfp8
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = tfhfp8.quantize(tf.constant([1.0, 0.1, 1000.0]), "hfp8_fwd", saturate=True)
            y = tfhfp8.quantize(tf.constant([2.0]), "hfp8_fwd")
            info = tfhfp8.ops.backend_info()
        print(len([w for w in caught if "C++ kernels are unavailable" in str(w.message)]))
        print(info["backend"], "expected initializer" in info["cpp_error"])
        """, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "tf", "True"]


def test_damaged_cached_library_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(build.cache_dir(), cache,
                    ignore=lambda d, names: [n for n in names if n.endswith(".log")])
    library = cache / build.library_path().name
    library.write_bytes(library.read_bytes()[:4096])  # truncated, as by a full disk
    result = _python("""
        import tensorflow as tf, tfhfp8
        print(tfhfp8.quantize(tf.constant([0.1]), "hfp8_fwd").numpy()[0])
        print(tfhfp8.ops.backend_info()["backend"])
        """, {"TFHFP8_CACHE_DIR": str(cache), "TFHFP8_BACKEND": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["0.1015625", "cpp"]
    assert library.stat().st_size > 4096


def test_cached_objects_are_reused_only_when_intact(tmp_path):
    # What lets a damaged library be relinked instead of recompiled (test above).
    obj = tmp_path / "a.o"
    obj.write_bytes(b"\1" * 1000)
    cached = tmp_path / "objects" / "key.o"
    cached.parent.mkdir()
    assert not build._is_intact(cached)
    build._publish(obj, cached)
    assert build._is_intact(cached) and cached.read_bytes() == obj.read_bytes()
    cached.write_bytes(b"\1" * 10)  # truncated
    assert not build._is_intact(cached)


def test_loop_objects_are_shared_by_tensorflow_versions(tmp_path, monkeypatch):
    # The loops include no TensorFlow header: CI's second TensorFlow reuses them.
    commands, _, tf_free = build._commands(tmp_path)
    assert tf_free == len(build.LOOPS) * len(build.variants())
    base = build.base_digest()
    before = [build.cached_object(base, c, i >= tf_free) for i, c in enumerate(commands)]
    monkeypatch.setattr(build.tf, "__version__", "0.0.0")
    after = [build.cached_object(base, c, i >= tf_free) for i, c in enumerate(commands)]
    assert before[:tf_free] == after[:tf_free]
    assert all(b != a for b, a in zip(before[tf_free:], after[tf_free:]))
    assert len(set(before)) == len(before)  # one object, one key


# -- the raw ops validate their inputs (each probe in a subprocess: a crash fails it) --

RAW_OPS = [
    ("inner zero", "lib.hfp8_quantize_fixed(tf.ones([4]), [0, 0], tf.constant(0, tf.int64), "
     "seed, bits=16, rounding='nearest_even', saturate=False)", "inner must be >= 1"),
    ("inner negative", "lib.hfp8_quantize_fixed(tf.ones([4]), [0, 0], tf.constant(-2, tf.int64), "
     "seed, bits=16, rounding='nearest_even', saturate=False)", "inner must be >= 1"),
    ("inner overflow", "lib.hfp8_quantize_fixed(tf.ones([8]), [0, 0, 0, 0], "
     "tf.constant(2**62, tf.int64), seed, bits=16, rounding='nearest_even', saturate=False)",
     "must divide the size of x"),
    ("exponent rank 2", "lib.hfp8_quantize_fixed(tf.ones([4]), [[0, 0]], "
     "tf.constant(1, tf.int64), seed, bits=16, rounding='nearest_even', saturate=False)",
     "must be a scalar|rank"),
    ("exponent too large", "lib.hfp8_quantize_fixed(tf.ones([4]), [400], "
     "tf.constant(1, tf.int64), seed, bits=16, rounding='nearest_even', saturate=False)",
     r"exponent must be in \[-149, 128\]"),
    ("seed vector", "lib.hfp8_quantize_float(tf.ones([4]), tf.constant([1, 2], tf.int64), "
     "exponent_bits=4, mantissa_bits=3, bias=7, specials='ieee', subnormals=True, "
     "rounding='stochastic', saturate=False)", "must be a scalar|rank"),
    ("dfp seed vector", "lib.hfp8_quantize_dfp(tf.ones([4]), tf.constant([1, 2], tf.int64), "
     "bits=16, rounding='stochastic', saturate=False)", "must be a scalar|rank"),
    ("bias unfit", "lib.hfp8_quantize_float(tf.ones([4]), seed, exponent_bits=8, "
     "mantissa_bits=3, bias=127, specials='fn', subnormals=True, rounding='nearest_even', "
     "saturate=False)", "spans more binades than float32"),
    ("bias range", "lib.hfp8_quantize_float(tf.ones([4]), seed, exponent_bits=4, "
     "mantissa_bits=3, bias=200, specials='fn', subnormals=True, rounding='nearest_even', "
     "saturate=False)", r"bias must be in \[-112, 127\], got 200"),
    ("bits", "lib.hfp8_quantize_dfp(tf.ones([4]), seed, bits=40, rounding='nearest_even', "
     "saturate=False)", r"bits must be in \[2, 24\]"),
]


@pytest.fixture(scope="module")
def raw_op_results():
    """Runs every probe of RAW_OPS, eagerly and in a graph, in one subprocess: a crash
    there (SIGFPE, SIGSEGV) fails the probes it reached instead of killing pytest."""
    probes = "\n".join(f"    ({name!r}, lambda: {call})," for name, call, _ in RAW_OPS)
    result = _python(f"""
import tensorflow as tf
from tfhfp8.ops import cpp_backend
lib, seed = cpp_backend.load(), tf.constant(0, tf.int64)
probes = [
{probes}
]
for name, run in probes:
    for mode in ("eager", "graph"):
        print("START", mode, name, flush=True)
        try:
            tf.function(run)() if mode == "graph" else run()
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            print("ERROR", mode, name, "|", str(error).replace(chr(10), " "), flush=True)
        else:
            print("NO ERROR", mode, name, flush=True)
""")
    return result


@pytest.mark.parametrize("name,call,message", RAW_OPS, ids=[c[0] for c in RAW_OPS])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_raw_ops_reject_bad_inputs(name, call, message, mode, raw_op_results):
    lines = raw_op_results.stdout.splitlines()
    assert f"START {mode} {name}" in lines, raw_op_results.stderr[-2000:]
    outcome = lines[lines.index(f"START {mode} {name}") + 1:][:1]
    assert outcome, f"the process died on this probe ({raw_op_results.returncode})"
    assert outcome[0].startswith(f"ERROR {mode} {name} |"), outcome[0]
    assert re.search(message, outcome[0]), outcome[0]


# -- exactness fixes found by probing ---------------------------------------------------

def _float32_bit_classes():
    """Every float32 subnormal, both signs, and every exponent's edges and samples."""
    sub = np.arange(0, 1 << 23, dtype=np.uint32)
    exponents = np.arange(1, 255, dtype=np.uint32) << 23
    mantissas = np.array([0, 1, 2, (1 << 22) - 1, 1 << 22, (1 << 22) + 1, (1 << 23) - 1,
                          0x2AAAAA, 0x555555], np.uint32)
    normal = (exponents[:, None] | mantissas[None, :]).ravel()
    specials = np.array([0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF], np.uint32)
    bits = np.concatenate([sub, normal, specials])
    return np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic", "toward_zero"])
def test_float32_layout_is_the_identity_on_float32(rounding, backend):
    x = _float32_bit_classes()
    fmt = tfhfp8.FloatFormat(8, 23)
    y = tfhfp8.quantize(tf.constant(x), fmt, rounding=rounding, seed=3)
    assert_same_bits(y.numpy(), x, x, f"FloatFormat(8, 23) {rounding}")
    # Saturation clamps only the infinities (to +-max, as documented).
    y = tfhfp8.quantize(tf.constant(x), fmt, rounding=rounding, saturate=True, seed=3).numpy()
    expected = np.where(np.isinf(x), np.copysign(np.finfo(np.float32).max, x), x)
    assert_same_bits(y, expected.astype(np.float32), x, f"FloatFormat(8, 23) {rounding} sat")


@pytest.mark.parametrize("dtype,values", [
    (np.float32, [3e38, 1e-30, -1e38]),
    (np.float32, [np.finfo(np.float32).max, 1.0]),
    (np.float64, [1e300, 1e-30, -1e38]),
    (np.float64, [-np.finfo(np.float64).max / 3, 2.0]),
])
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"])
def test_dfp_of_huge_magnitudes_agrees_on_both_backends(dtype, values, rounding, monkeypatch):
    from fractions import Fraction
    import reference as R

    x = np.array(values, dtype)
    results = {}
    for name in ("tf", "cpp"):
        monkeypatch.setenv("TFHFP8_BACKEND", name)
        results[name] = tfhfp8.quantize(tf.constant(x), "int16_dfp", rounding=rounding).numpy()
    assert_same_bits(results["cpp"], results["tf"], x, "cpp vs tf")
    min_exponent = -149 if dtype == np.float32 else -1074
    e_s = R.dfp_exponent([float(v) for v in x], 16, rounding, min_exponent)
    for got, v in zip(results["tf"], x):
        exact = R._round_integer(Fraction(float(v)) / Fraction(2) ** e_s, rounding) \
            * Fraction(2) ** e_s if v >= 0 else -R._round_integer(
                -Fraction(float(v)) / Fraction(2) ** e_s, rounding) * Fraction(2) ** e_s
        big = float(np.finfo(dtype).max)
        want = np.copysign(np.inf, float(v)) if abs(exact) > big else dtype(float(exact))
        assert got == want or (np.isinf(got) and np.isinf(want) and got == want), (v, got, want)
