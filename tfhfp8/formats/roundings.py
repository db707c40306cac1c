"""How a value between two representable neighbours is rounded.

- `"nearest_even"`: to the nearer neighbour, ties to the one with an even mantissa.
- `"stochastic"`: up with probability equal to the distance from the lower neighbour
  over the gap (unbiased on average), from a counter-based seed.
- `"toward_zero"`: to the neighbour of smaller magnitude (truncation).

Every quantizer, accumulator and all-reduce of tfhfp8 takes one of these names.
"""

ROUNDINGS = ("nearest_even", "stochastic", "toward_zero")
