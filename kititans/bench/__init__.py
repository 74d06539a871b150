"""Benchmarks: speed, memory and quality (perplexity drift, KLD) of every runtime and quantization level."""
