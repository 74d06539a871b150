"""KiTitans: train small chat language models and ship them to llama.cpp, ONNX Runtime and CoreML."""

import os as _os

# Before torch loads OpenMP: spinning worker threads make a busy 2-core machine 3-20x slower on small ops
# (measured: decode of a 4M model 31 ms/token spinning vs 1.5 ms passive under load).
# KITITANS_OMP_WAIT_POLICY=unset leaves the OpenMP library's own default (a bench option on dedicated devices).
if _os.environ.get("KITITANS_OMP_WAIT_POLICY", "").lower() != "unset":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
