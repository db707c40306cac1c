"""tfmot's default 8-bit integer QAT vs tfhfp8's hfp8 QAT through `tfhfp8.tfmot`, on the
same tf-keras CNN and data: `python -m models.tfmot_comparison` (see `__main__.py`)."""
