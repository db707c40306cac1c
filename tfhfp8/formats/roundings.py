"""How a value between two representable neighbours is rounded, and what overflows give.

Rounding names (every quantizer and every format takes them; the accumulators and the
all-reduce the three of `BASIC_ROUNDINGS`):

- `"nearest_even"`: to the nearer neighbour, ties to the one with an even code.
- `"nearest_away"`: to the nearer neighbour, ties away from zero.
- `"toward_zero"`, `"toward_positive"`, `"toward_negative"`: the directed roundings
  of IEEE 754 (truncation, ceiling, floor).
- `"stochastic"`: up with probability equal to the distance from the lower neighbour
  over the gap, from a counter-based seed (unbiased to the float's full precision).
- `"stochastic_r<r>"`, `"stochastic_odd_r<r>"`, `"stochastic_fast_r<r>"` (1 <= r <= 23):
  stochastic rounding that uses exactly `r` random bits per element, as gfloat's
  `RoundMode.Stochastic`, `StochasticOdd` and `StochasticFast` define it with
  `srnumbits=r`: the first rounds the distance to the lower neighbour (as a fraction of
  the gap) to `r` bits, ties to even, and rounds away from zero when that plus the `r`
  random bits reaches 2^r; `_odd` breaks those ties to odd; `_fast` rounds away when
  the distance plus (0.5 + bits) / 2^r reaches 1. Each is off by the distance's
  rounding to r bits (at most 2^-(r+1) of the gap); the first two average that out over
  ties, `_fast` is biased away from zero by 2^-(r+1) on every tie (gfloat's note;
  Fitzgibbon and Felix, ARITH 2025; docs/results.md measures it).
  `with_random_bits("stochastic", r)` spells the name.

Overflow behaviours (`saturate=` of the quantizers; IEEE P3109's names):

- `"ovf_inf"` (or False): an overflow becomes an infinity where the format has them,
  else NaN where it has that, else the largest finite value: the format's own cast.
- `"sat_finite"` (or True): overflows and infinities become the largest finite value.
- `"sat_propagate"`: finite overflows become the largest finite value; infinities stay
  infinite (NaN in a format without them).

The directed roundings never round a finite value beyond the largest finite one in
their own direction (IEEE 754 §7.4): toward zero, and toward -inf for positive values
(toward +inf for negative ones), a finite overflow gives the largest finite value.
"""

import dataclasses
import re
from typing import Optional

DIRECTED = ("nearest_even", "nearest_away", "toward_zero", "toward_positive",
            "toward_negative")
STOCHASTIC_VARIANTS = ("stochastic", "stochastic_odd", "stochastic_fast")
ROUNDINGS = DIRECTED + ("stochastic",)
"""The rounding names that take no number of random bits."""
BASIC_ROUNDINGS = ("nearest_even", "stochastic", "toward_zero")
"""The roundings of the accumulators (`tfhfp8.Accumulator`) and the all-reduce."""
MAX_RANDOM_BITS = 23
OVERFLOWS = ("ovf_inf", "sat_finite", "sat_propagate")

_WITH_BITS = re.compile(r"^(stochastic|stochastic_odd|stochastic_fast)_r([1-9]\d?)$")
_ALLOWED = (f"one of {ROUNDINGS}, or 'stochastic_r<r>', 'stochastic_odd_r<r>' or "
            f"'stochastic_fast_r<r>' with 1 <= r <= {MAX_RANDOM_BITS}")


@dataclasses.dataclass(frozen=True)
class Rounding:
    """A parsed rounding name: `mode` (a `DIRECTED` name or a `STOCHASTIC_VARIANTS`
    one) and `random_bits` (None: the full-precision draw of `"stochastic"`)."""
    mode: str
    random_bits: Optional[int] = None

    @property
    def stochastic(self) -> bool:
        return self.mode in STOCHASTIC_VARIANTS


def parse(name) -> Rounding:
    """The `Rounding` a name stands for; a ValueError naming what is allowed."""
    if isinstance(name, str):
        if name in ROUNDINGS:
            return Rounding(name)
        match = _WITH_BITS.match(name)
        if match and 1 <= int(match.group(2)) <= MAX_RANDOM_BITS:
            return Rounding(match.group(1), int(match.group(2)))
    raise ValueError(f"rounding must be {_ALLOWED}; got {name!r}")


def is_stochastic(name) -> bool:
    """Whether the rounding `name` draws random bits (and so takes a seed); False for
    any other name, the master weights' `"kahan"` included."""
    return name == "stochastic" or (isinstance(name, str) and _WITH_BITS.match(name) is not None)


def with_random_bits(name, random_bits):
    """The rounding name of the stochastic variant `name` with `random_bits` bits.

    >>> with_random_bits("stochastic", 8)
    'stochastic_r8'
    """
    if name not in STOCHASTIC_VARIANTS:
        raise ValueError(f"random_bits is for the stochastic roundings "
                         f"{STOCHASTIC_VARIANTS}, not rounding={name!r}")
    if isinstance(random_bits, bool) or not isinstance(random_bits, int) or not (
            1 <= random_bits <= MAX_RANDOM_BITS):
        raise ValueError(f"random_bits must be an integer in [1, {MAX_RANDOM_BITS}], got "
                         f"{random_bits!r}")
    return f"{name}_r{random_bits}"


def overflow(saturate):
    """`saturate` as the backends take it: False (`"ovf_inf"`), True (`"sat_finite"`)
    or `"sat_propagate"`; a ValueError naming what is allowed otherwise."""
    if isinstance(saturate, bool):
        return saturate
    if saturate in OVERFLOWS:
        return {"ovf_inf": False, "sat_finite": True}.get(saturate, saturate)
    raise ValueError(f"saturate must be True, False or one of {OVERFLOWS}, got {saturate!r}")
