"""The Titans family: a transformer with a neural long-term memory (MAC, MAG, MAL blocks).

One package: config.py (dataclass, presets, parameter roles), memory_math.py and memory.py (the neural
memory), state.py (the fixed-size decode state), attention.py, blocks.py, model.py (TitansModel and the
FamilySpec), onnx_step.py / coreml_step.py (static-shape step wrappers the exporters read from the spec),
hf.py / hf_model.py (the transformers remote-code file). The rest of the house reaches it through its
FamilySpec (`kititans.models.get_family("titans")`).
"""

from kititans.models.titans.config import PRESETS, TitansConfig
from kititans.models.titans.model import SPEC, TitansModel

__all__ = ["PRESETS", "SPEC", "TitansConfig", "TitansModel"]
