"""python -m models.stochastic_bits: see __main__.py."""
