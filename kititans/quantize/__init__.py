"""Quantization per format: GGUF types (gguf-py and llama.cpp's quantizer), ONNX int8/int4 (onnxruntime's
tools), CoreML compression (coremltools)."""
