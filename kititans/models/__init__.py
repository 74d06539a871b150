"""Model families. Each registers one FamilySpec (see spec.py); nothing here imports export libraries."""

from kititans.models.spec import FAMILIES, FamilySpec, Preset, Unsupported, find_preset, get_family

__all__ = ["FAMILIES", "FamilySpec", "Preset", "Unsupported", "find_preset", "get_family"]
