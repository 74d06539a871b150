"""KiTitans: train small chat language models and ship them to llama.cpp, ONNX Runtime and CoreML."""

__version__ = "0.1.0"
