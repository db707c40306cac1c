"""ONNX export of the reference models and the fine-tuned MiniLM in ONNX Runtime:
`python -m models.export` (the table of docs/deployment.md)."""
