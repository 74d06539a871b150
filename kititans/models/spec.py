"""FamilySpec: how a model family plugs into training, checkpoints, exporters and runtimes as data.

Shared code reads the spec; it never branches on a family's name. A format a family cannot be exported to
is an `Unsupported(reason)` entry, turned into an UnsupportedExport error that names the formats that work.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kititans.errors import KititansError, UnsupportedExport

# Parameter roles decide the optimizer: Muon takes "matrix", AdamW takes the rest.
ROLES = ("matrix", "embedding", "head", "scalar", "tensor")


@dataclass(frozen=True)
class Preset:
    name: str
    model: Mapping[str, Any]  # fields of the family's config dataclass
    train: Mapping[str, Any] = field(default_factory=dict)  # dotted RunConfig defaults, e.g. "train.seq_len"
    description: str = ""


@dataclass(frozen=True)
class Unsupported:
    reason: str


@dataclass(frozen=True)
class GgufLayout(Mapping):
    """A family's GGUF entry: the HF -> GGUF tensor map (read as this mapping: HF name pattern -> (GGUF name,
    config attribute with the head count whose Q/K rows are permuted, or None)), llama.cpp's architecture
    name, and the extra `<arch>.*` keys that architecture reads (an encoder: pooling type, non-causal)."""

    tensors: Mapping[str, tuple[str, str | None]]
    arch: str = "llama"
    kv: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    task: str = "lm"  # what llama.cpp computes: "lm" logits, or "embed" pooled vectors

    def __getitem__(self, key: str) -> tuple[str, str | None]:
        return self.tensors[key]

    def __iter__(self) -> typing.Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    presets: Mapping[str, Preset]
    description: str
    # export format -> family-specific object the exporter reads (a tensor map, a step wrapper...), or Unsupported
    formats: Mapping[str, Any] = field(default_factory=dict)
    # model -> {param name: role}; the default works for HF-style names
    param_roles: Callable[[nn.Module], dict[str, str]] | None = None
    # model -> {param name: row sizes} for matrices that fuse several logical ones along their output rows
    # (Titans' q|k|v): Muon orthogonalises and scales each block as the separate matrix it stands for
    param_splits: Callable[[nn.Module], dict[str, tuple[int, ...]]] | None = None
    # model -> modules whose parameters stay fp32 under mixed precision (Titans' neural memory): under FSDP2
    # each is its own unit with an fp32 parameter policy
    fp32_modules: Callable[[nn.Module], list[nn.Module]] | None = None
    # config -> extra config.json keys (Lite writes a valid transformers LlamaConfig)
    hf_config: Callable[[Any], dict[str, Any]] | None = None
    # config -> {file name: text} written into every run directory (Titans: its transformers remote-code file)
    run_files: Callable[[Any], dict[str, str]] | None = None
    # what the model is for: "lm" (next-token logits: generate, chat, serve) or "embed" (pooled, normalised
    # vectors: embed, search); verbs ask this, never the family's name
    task: str = "lm"
    # saved model config (config.json's kititans.model) -> the config that rebuilds that model: fills in what a
    # run saved by an older kititans did not store with that version's values (Titans: upgrade_config)
    upgrade_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # (model, config, seq_len) -> training FLOPs per token for MFU, where the family does work its parameter
    # count does not show (an encoder's bidirectional attention, Titans' memory); None: train/mfu.py's count
    flops_per_token: Callable[[nn.Module, Any, int], float] | None = None

    def make_config(self, preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> Any:
        base: dict[str, Any] = dict(self.presets[preset].model) if preset else {}
        for k, v in (overrides or {}).items():
            base[k] = v
        if self.upgrade_config and "revision" in base:  # `--set model.revision=1`: that revision's defaults
            base = self.upgrade_config(base)
        return config_from_dict(self.config_cls, base, what=f"{self.name} model")

    def build(self, config: Any) -> nn.Module:
        return self.model_cls(config)

    def roles(self, model: nn.Module) -> dict[str, str]:
        roles = (self.param_roles or default_param_roles)(model)
        names = {n for n, _ in model.named_parameters()}
        if set(roles) != names or not set(roles.values()) <= set(ROLES):
            missing = sorted(names - set(roles))[:5]
            raise AssertionError(
                f"{self.name}: parameter roles must cover every parameter (missing {missing})"
            )
        return roles

    def splits(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Row blocks of fused matrices, checked against their shapes."""
        out = dict(self.param_splits(model)) if self.param_splits else {}
        shapes = {n: p.shape for n, p in model.named_parameters()}
        for name, rows in out.items():
            if name not in shapes or len(shapes[name]) != 2 or sum(rows) != shapes[name][0]:
                raise AssertionError(
                    f"{self.name}: splits {rows} do not fit {name} {tuple(shapes.get(name, ()))}"
                )
        return out

    def support(self, fmt: str) -> Any:
        """The family's export object for `fmt`, or UnsupportedExport with the reason and what works."""
        entry = self.formats.get(fmt)
        if entry is None or isinstance(entry, Unsupported):
            works = [f for f, e in self.formats.items() if not isinstance(e, Unsupported)]
            reason = entry.reason if isinstance(entry, Unsupported) else f"no {fmt} exporter for this family"
            alt = f"; formats that work for {self.name}: {', '.join(works)}" if works else ""
            raise UnsupportedExport(f"{fmt} export of a {self.name} model is not possible: {reason}{alt}")
        return entry


FAMILIES: dict[str, FamilySpec] = {}
_FAMILY_MODULES = ("kititans.models.lite", "kititans.models.titans", "kititans.models.encoder")


def register(spec: FamilySpec) -> FamilySpec:
    assert spec.name not in FAMILIES, f"family {spec.name} registered twice"
    FAMILIES[spec.name] = spec
    return spec


def load_families() -> dict[str, FamilySpec]:
    for mod in _FAMILY_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return FAMILIES


def get_family(name: str) -> FamilySpec:
    fams = load_families()
    if name not in fams:
        raise KititansError(f"unknown model family {name!r}; valid families: {', '.join(sorted(fams))}")
    return fams[name]


def all_presets() -> dict[str, tuple[FamilySpec, Preset]]:
    out = {}
    for fam in load_families().values():
        for p in fam.presets.values():
            out[p.name] = (fam, p)
    return out


def find_preset(name: str, family: str | None = None) -> tuple[FamilySpec, Preset]:
    presets = all_presets()
    if family is not None:
        fam = get_family(family)
        if name in fam.presets:
            return fam, fam.presets[name]
        if f"{fam.name}-{name}" in fam.presets:  # `--family titans` with the default preset: titans-tiny
            return fam, fam.presets[f"{fam.name}-{name}"]
        valid = sorted(fam.presets)
    else:
        if name in presets:
            return presets[name]
        valid = sorted(presets)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KititansError(f"unknown preset {name!r}{hint}; valid presets: {', '.join(valid)}")


def config_from_dict(cls: type, d: Mapping[str, Any], what: str = "model", strict: bool = True) -> Any:
    """Build a config dataclass; unknown keys are an error for user input, ignored for old checkpoints."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown and strict:
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KititansError(
            f"unknown {what} config key {unknown[0]!r}{hint}; valid keys: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        typ = hints.get(k)
        ok = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(typ)
        if ok and (not isinstance(v, ok) or (typ is not bool and isinstance(v, bool))):
            raise KititansError(f"{what} config key {k!r} must be {typ.__name__}, got {v!r}")
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as e:
        raise KititansError(f"invalid {what} config: {e}") from None


def default_param_roles(model: nn.Module) -> dict[str, str]:
    """HF-style names: embeddings and lm_head by name, 1-D gains as scalars, 2-D block weights as matrices."""
    roles = {}
    for name, p in model.named_parameters():
        if "embed" in name:
            roles[name] = "embedding"
        elif name.startswith("lm_head"):
            roles[name] = "head"
        elif p.ndim < 2:
            roles[name] = "scalar"
        elif p.ndim == 2:
            roles[name] = "matrix"
        else:
            roles[name] = "tensor"
    return roles


def count_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embedding and "embed" in name):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def param_table(model: nn.Module, component: Callable[[str], str]) -> list[tuple[str, int]]:
    """Parameter count per component (shared tensors counted once), in first-seen order."""
    seen: set[int] = set()
    table: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = component(name)
        table[key] = table.get(key, 0) + p.numel()
    return list(table.items())


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> Any:
    """An autocast context for bf16/fp16 compute, or a no-op for fp32."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
