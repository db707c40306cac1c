"""The arithmetic of an emulated gradient all-reduce: `GradientCommunication`.

**The arithmetic** (N replicas, one gradient tensor flattened to n elements, `Q` the
rounding to `format` with `rounding`, saturating by default):

1. *Scaling* (`scaling="absmax"`, optional): `amax` = the largest `|g|` of the tensor
   over all replicas; every replica multiplies its gradient by the same power of two
   `s = 2^floor(log2(format.max / (N * amax)))` (1 when `amax` is 0 or not finite), so
   that small gradients do not underflow and the sum of N cannot overflow; the result
   is divided by `s` at the end. Powers of two make both steps exact.
2. *Send*: replica `r` rounds its (scaled) gradient: `q_r = Q(s * g_r)`.
3. *Reduce*:
   - `"ring"` (reduce-scatter, then all-gather): the n elements are split into N
     consecutive chunks (`numpy.array_split`: the first `n % N` chunks one element
     longer). Chunk `c` is summed hop by hop in ring order starting at replica `c + 1`:
     `a = q_{c+1}`, then `a = Q(a + q_{c+2})`, ..., `a = Q(a + q_c)` (indices mod N),
     every partial sum rounded. The all-gather copies the reduced chunks unchanged.
   - `"tree"`: pairwise rounds: the values `v_0 .. v_{N-1}` (the `q_r`) are replaced
     by `Q(v_0 + v_1), Q(v_2 + v_3), ...` (an unpaired last value passes on unchanged)
     until one is left; for N = 4: `Q(Q(q_0 + q_1) + Q(q_2 + q_3))`, for N = 3:
     `Q(Q(q_0 + q_1) + q_2)`.
   - `"direct"`: one rounding of the sum: `Q(q_0 + q_1 + ... + q_{N-1})`.
4. The reduced value divided by `s`, in float32, is every replica's gradient.

Sums are formed in float64 and rounded once to `format` from the float64 bits
(`tfhfp8.quantize`). A sum of two values of a format with at most 24 significant bits
is exact in float64 (`format` spans <= 53 bits: every 8-bit format and float16), or
else correctly rounded after the float64 rounding (Figueroa 1995: double rounding of a
sum is innocuous when 53 >= 2p + 1), so `"ring"` and `"tree"` are exact with
`"nearest_even"` for every format. `"direct"` sums N values: exact when the format's
values and N fit in float64's 53 bits (`GradientCommunication.exact_sums`: every 8-bit
format and float16 for N <= 2^10); for bfloat16 and float32 the float64 sum of the N
values (in replica order) is rounded, which can differ from the exact sum's rounding
when the addends span more than 29 binades. Stochastic rounding is applied to the
float64 sum, which is the exact sum whenever `exact_sums` holds.

**Stochastic rounding** seeds are counter-based (`tfhfp8.quantize(..., seed=)`), from
the optimizer's step counter (saved with the optimizer: a resumed run rounds as the
uninterrupted one) and a hash of the phase: the send of replica `r` uses `("send",
r)`, hop `k` of the ring `("ring", k)` (chunk `c` at hop `k` is rounded by replica
`c + 1 + k`), a tree round `("tree", level, pair)`, the direct sum `("direct",)`; the
random bits of an element also hash its index in the concatenation of all the
gradients of the step, so no two elements, replicas, phases or steps share them.

**Sources.** Sun et al. 2019 (HFP8) name "a DNN end-to-end distributed training
procedure" among their contributions; the public material searched here (the NeurIPS
abstract, meta-review and IBM's publication page) does not describe it, so no preset
claims to reproduce it. The ring convention is the usual reduce-scatter + all-gather
(SPEC §9); a per-tensor scale agreed across replicas is what Microsoft's FP8-LM does
for its FP8 gradient all-reduce ("auto-scaling" with a shared scalar).

Every replica computes this same reduction from all the replicas' gradients
(`tfhfp8.replicas.gather_replicas`); `tfhfp8.distribute` plugs it into Keras training.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tfhfp8 import formats, registry
from tfhfp8.formats.roundings import BASIC_ROUNDINGS
from tfhfp8.ops import tf_block
from tfhfp8.quantization import quantize
from tfhfp8.replicas import gather_replicas
from tfhfp8.rounding import stochastic_seed

ALGORITHMS = ("ring", "tree", "direct")
SCALINGS = (None, "absmax")
_FLOAT32 = formats.FloatFormat(8, 23, name="float32")


def _format(value):
    if isinstance(value, str) and value == "float32":
        return _FLOAT32
    try:
        fmt = formats.get(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"format: {error}") from None
    if not isinstance(fmt, formats.FloatFormat):
        raise ValueError(f"format must be a float format (a name such as 'float8_e5m2', "
                         f"'bfloat16', 'float32', or a tfhfp8.FloatFormat), got {fmt!r}: "
                         "a sum of values sharing an exponent or a block scale is not defined")
    return fmt


# TensorFlow's CPU kernels flush float32 subnormals to zero (denormals-are-zero), a cast
# included: float32 <-> float64 goes through the bits here (`tf_block.to_float64`), so
# that gradients below 2^-126 (and bfloat16 or float32 results down there) are kept
# exactly.
def _to_float32(y):
    """float64 -> float32 rounded to nearest even, subnormals included."""
    rounded = quantize(y, _FLOAT32)  # overflow to inf, as a cast
    return tf.where(tf.math.is_finite(rounded), tf_block.float64_to_float32_exact(rounded),
                    tf.cast(rounded, tf.float32))


# -- the arithmetic ----------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tfhfp8")
class GradientCommunication:
    """The emulated arithmetic of a gradient all-reduce (see the module docstring).

    Args:
      format: the communication format: a float format name (`"float8_e5m2"`,
        `"bfloat16"`, `"float16"`, `"float32"`, ...) or a `tfhfp8.FloatFormat`.
      algorithm: `"ring"` (reduce-scatter + all-gather, every partial sum rounded),
        `"tree"` (pairwise) or `"direct"` (one rounding of the sum).
      rounding: `"nearest_even"`, `"stochastic"` or `"toward_zero"`, for the send
        and every partial sum.
      scaling: None, or `"absmax"`: a power-of-two per-tensor scale agreed across
        replicas from the global max |g|, removed after the reduction.
      saturate: clamp overflow to +-max (True, what training uses) or follow the
        format's own overflow (inf or NaN).

    >>> import numpy as np, tfhfp8
    >>> ring = tfhfp8.distribute.GradientCommunication("float8_e5m2")
    >>> g = np.array([[1.0, 0.3], [0.125, 0.3], [0.1, 0.3]], np.float32)  # 3 replicas
    >>> ring.reduce([g])[0].numpy().tolist()  # 0.3125 * 3 = 0.9375: a tie, to even
    [1.25, 1.0]
    """

    def __init__(self, format, algorithm="ring", rounding="nearest_even", scaling=None,
                 saturate=True):
        self.format = _format(format)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if not isinstance(rounding, str) or rounding not in BASIC_ROUNDINGS:
            raise ValueError(f"rounding must be one of {BASIC_ROUNDINGS}, got {rounding!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if not isinstance(saturate, bool):
            raise ValueError(f"saturate must be True or False, got {saturate!r}")
        self.algorithm, self.rounding, self.scaling = algorithm, rounding, scaling
        self.saturate = saturate

    def exact_sums(self, replicas):
        """True when float64 holds every partial sum of `replicas` values of the format
        exactly (so `"direct"` rounds the exact sum)."""
        fmt = self.format
        top = math.frexp(fmt.max)[1]  # max < 2^top
        bottom = math.frexp(fmt.min_subnormal)[1] - 1  # min_subnormal = 2^bottom
        return top + math.ceil(math.log2(max(replicas, 1))) - bottom <= 53

    # -- one tensor ----------------------------------------------------------------------
    def _round(self, x, step, *key):
        seed = None
        if self.rounding == "stochastic":
            seed = stochastic_seed(tf.zeros([], tf.int64) if step is None else step, *key)
        return quantize(x, self.format, rounding=self.rounding, saturate=self.saturate,
                        seed=seed)

    def _scale_exponent(self, g, segments, count, replicas):
        """Per tensor: k with s = 2^k (float64) from the global amax of its values
        (g: [N, total] float64; segments: the tensor of each element)."""
        amax = tf.math.unsorted_segment_max(tf.reduce_max(tf.abs(g), axis=0), segments,
                                            count)
        usable = tf.math.is_finite(amax) & (amax > 0)
        safe = tf.where(usable, amax, tf.ones_like(amax))
        bound = tf.constant(self.format.max / replicas, tf.float64)
        two = tf.constant(2.0, tf.float64)
        k = tf.floor(tf.math.log(bound / safe) / math.log(2.0))
        # log may be off by one near powers of two: settle k exactly.
        k = tf.where(tf.pow(two, k) * safe > bound, k - 1, k)
        k = tf.where(tf.pow(two, k + 1) * safe <= bound, k + 1, k)
        return tf.where(usable, k, tf.zeros_like(k))

    def reduce(self, stacked, step=None):
        """The emulated all-reduce of a list of gradients, each stacked over the
        replicas along its first axis (`[N, ...]`, static shapes); returns the reduced
        tensors (the shape and dtype of one replica's value). `step`: an int64 scalar,
        the stochastic-rounding counter (None: 0).

        Every gradient is reduced on its own (its own chunks and scale), all of them in
        the same few operations: the list is concatenated, and stochastic rounding
        hashes each element's index in that concatenation with the seed of the phase.
        """
        stacked = [tf.convert_to_tensor(t) for t in stacked]
        if not stacked:
            return []
        replicas = stacked[0].shape[0]
        sizes = [t.shape[1:].num_elements() for t in stacked]
        if (replicas is None or any(size is None for size in sizes)
                or any(t.shape[0] != replicas for t in stacked)):
            raise ValueError("reduce needs static shapes with the same number of replicas "
                             f"first, got {[t.shape for t in stacked]}")
        g = tf.concat([tf.reshape(tf_block.to_float64(tf.cast(t, tf.float32)), [replicas, size])
                       for t, size in zip(stacked, sizes)], axis=1)
        segments = np.repeat(np.arange(len(sizes)), sizes)
        k = None
        if self.scaling == "absmax":
            k = tf.gather(self._scale_exponent(g, segments, len(sizes), replicas), segments)
            g = g * tf.pow(tf.constant(2.0, tf.float64), k)
        sent = [self._round(g[r], step, "send", r) for r in range(replicas)]
        if replicas == 1 or sum(sizes) == 0:
            total = sent[0]
        elif self.algorithm == "ring":
            total = self._ring(tf.stack(sent), replicas, sizes, step)
        elif self.algorithm == "tree":
            level, values = 0, sent
            while len(values) > 1:
                pairs = [self._round(values[i] + values[i + 1], step, "tree", level, i // 2)
                         for i in range(0, len(values) - 1, 2)]
                values = pairs + ([values[-1]] if len(values) % 2 else [])
                level += 1
            total = values[0]
        else:
            exact = sent[0]
            for value in sent[1:]:
                exact = exact + value
            total = self._round(exact, step, "direct")
        if k is not None:
            total = total / tf.pow(tf.constant(2.0, tf.float64), k)
        total = _to_float32(total)
        parts = tf.split(total, sizes) if len(sizes) > 1 else [total]
        return [tf.reshape(tf.cast(p, t.dtype), t.shape[1:]) for p, t in zip(parts, stacked)]

    def _ring(self, sent, replicas, sizes, step):
        # In each tensor, chunk c is summed starting at replica c + 1: at hop k an element
        # of chunk c receives the value of replica (c + 1 + k) mod N.
        chunk = np.concatenate([
            np.repeat(np.arange(replicas),
                      [len(c) for c in np.array_split(np.arange(size), replicas)])
            for size in sizes])
        total = chunk.size
        flat = tf.reshape(sent, [-1])
        position = np.arange(total)

        def hop(k):
            source = (chunk + 1 + k) % replicas
            return tf.gather(flat, tf.constant(source * total + position, tf.int64))

        acc = hop(0)
        for k in range(1, replicas):
            acc = self._round(acc + hop(k), step, "ring", k)
        return acc

    def all_reduce(self, values, step=None):
        """Inside a replica context: gathers every replica's `values` (a list of
        tensors) and returns their emulated sum, identical on every replica."""
        values = [tf.convert_to_tensor(v) for v in values]
        if not values:
            return []
        sizes = [v.shape.num_elements() for v in values]
        if any(size is None for size in sizes):
            raise ValueError("GradientCommunication needs gradients of static shapes, got "
                             f"{[v.shape for v in values]}")
        flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in values], 0)
        gathered = gather_replicas(flat)  # [N, total]: one gather for every gradient
        parts = tf.split(gathered, sizes, axis=1) if len(values) > 1 else [gathered]
        stacked = [tf.reshape(p, [-1, *v.shape]) for p, v in zip(parts, values)]
        return [tf.cast(r, v.dtype) for r, v in zip(self.reduce(stacked, step), values)]

    # -- serialization -------------------------------------------------------------------
    @property
    def name(self):
        """The preset (`names()`) this communication is, or None."""
        return next((name for name, kwargs in PRESETS.items()
                     if GradientCommunication(**kwargs) == self), None)

    def get_config(self):
        fmt = "float32" if self.format == _FLOAT32 else formats.serialize(self.format)
        return {"format": fmt, "algorithm": self.algorithm, "rounding": self.rounding,
                "scaling": self.scaling, "saturate": self.saturate}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(str(self.get_config()))

    def __repr__(self):
        config = self.get_config()
        fmt = config.pop("format")
        return (f"GradientCommunication({fmt if isinstance(fmt, str) else self.format!r}, "
                + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")")


PRESETS = {
    "float32": dict(format="float32"),
    "float16": dict(format="float16"),
    "bfloat16": dict(format="bfloat16"),
    "float8_e5m2": dict(format="float8_e5m2"),
    "float8_e5m2_scaled": dict(format="float8_e5m2", scaling="absmax"),
}


def _from_plain_config(config):
    return GradientCommunication.from_config(config) if "format" in config else None


REGISTRY = registry.Registry(
    "gradient communication", GradientCommunication,
    {name: (lambda kwargs: lambda **extra: GradientCommunication(**{**kwargs, **extra}))(kw)
     for name, kw in PRESETS.items()},
    from_plain_config=_from_plain_config,
    hint="; or build one with tfhfp8.distribute.GradientCommunication(format, ...).")


def names():
    """Names of the preset communications (ring, nearest even)."""
    return REGISTRY.names()


def get(identifier):
    """A GradientCommunication from None, a preset name, a float format name (a ring
    in that format), a config or itself."""
    if identifier is None:
        return None
    if isinstance(identifier, str) and identifier not in REGISTRY.entries:
        try:
            return GradientCommunication(identifier)
        except (TypeError, ValueError):
            pass  # the registry's message lists the presets
    return REGISTRY.get(identifier)


def serialize(communication):
    """A preset's name when unmodified, else the Keras config (None stays None)."""
    return REGISTRY.serialize(communication)
