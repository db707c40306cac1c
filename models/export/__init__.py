"""ONNX / SavedModel export of the reference models and the fine-tuned MiniLM: `python -m models.export`."""
