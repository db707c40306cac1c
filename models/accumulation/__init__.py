"""Accumulation study (see __main__.py): FP32 vs FP16 (chunked) vs INT32 sums."""
