"""python -m models.tensor_cores: see __main__.py."""
