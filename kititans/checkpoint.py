"""THE model directory format (DESIGN.md): save, load, upgrade.

runs/<name>/
  config.json            family, model dims, format_version, kititans version, the resolved run config
                         (for Lite also a valid transformers LlamaConfig)
  model.safetensors      weights only, canonical names, no pickle
  tokenizer.model, tokenizer_config.json, tokenizer.json, generation_config.json
  train_state/           optimizer state (safetensors + JSON) and step: only for --resume
  metrics.jsonl          one line per logged step
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import kititans
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.files import atomic_path, read_json, write_json
from kititans.models.spec import FamilySpec, config_from_dict, get_family

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


@dataclass
class Checkpoint:
    path: Path
    spec: FamilySpec
    config: Any  # the family's config dataclass
    model: nn.Module
    tokenizer: Tokenizer
    meta: dict[str, Any]  # the "kititans" section of config.json

    @property
    def generation_config(self) -> dict[str, Any]:
        p = self.path / "generation_config.json"
        return read_json(p) if p.is_file() else {}


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile / DDP wrappers, so saved names never carry `_orig_mod.`."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def state_dict_for_save(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Canonical weights (of `model`, or a full state dict gathered from it, e.g. under FSDP2); a parameter
    registered under two names (tied embeddings) is stored once."""
    model = unwrap(model)
    skip = aliases(model)
    items = (state if state is not None else model.state_dict()).items()
    return {n: t.detach().to("cpu").contiguous() for n, t in items if n not in skip}


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    spec: FamilySpec,
    config: Any,
    tokenizer: Tokenizer,
    extra: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights (the model's, or `weights`: its gathered full state dict), config.json, tokenizer and
    generation config; each file atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / WEIGHTS) as tmp:
        tensors = state_dict_for_save(model, weights)
        save_file(tensors, str(tmp), metadata={"format": "pt", "family": spec.name})
    # tokenizer.model, tokenizer_config.json (model_max_length = the context) and tokenizer.json
    tokenizer.save(run_dir, context_length=getattr(config, "context_length", None))
    for name, text in (spec.run_files(config) if spec.run_files else {}).items():  # e.g. remote-code modeling
        with atomic_path(run_dir / name) as tmp:
            tmp.write_text(text)
    cfg: dict[str, Any] = (
        dict(spec.hf_config(config)) if spec.hf_config else {"model_type": f"kititans-{spec.name}"}
    )
    cfg.update({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    if tokenizer.pad_id >= 0:
        cfg["pad_token_id"] = tokenizer.pad_id
    cfg["kititans"] = {
        "format_version": FORMAT_VERSION,
        "version": kititans.__version__,
        "family": spec.name,
        "model": dataclasses.asdict(config),
        **(extra or {}),
    }
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.stop_ids,
        "pad_token_id": tokenizer.pad_id if tokenizer.pad_id >= 0 else None,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "max_new_tokens": 256,
        **(generation or {}),
    }
    write_json(run_dir / "generation_config.json", gen)
    write_json(run_dir / "config.json", cfg)  # last: its presence marks a complete checkpoint
    return run_dir


def upgrade(
    meta: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Bring an older checkpoint to FORMAT_VERSION, one named step per version (none yet: v1 is the first)."""
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise KititansError(
            f"this checkpoint has format_version {version}, newer than this kititans understands "
            f"({FORMAT_VERSION}): pip install -U kititans"
        )
    if version < 1:
        raise KititansError(f"unknown checkpoint format_version {version!r}")
    return meta, state


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise KititansError(f"no such run directory: {path}")
    if not (path / "config.json").is_file():
        raise KititansError(f"{path} is not a kititans run directory (no config.json)")
    meta = read_json(path / "config.json").get("kititans")
    if not isinstance(meta, dict) or "family" not in meta:
        raise KititansError(f"{path}/config.json has no 'kititans' section: not a kititans run directory")
    return meta


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load a run directory, checking format_version, tensors (names and shapes) and tokenizer vocab size."""
    path = Path(path)
    meta = read_meta(path)
    if not (path / WEIGHTS).is_file():
        raise KititansError(f"{path}: missing {WEIGHTS} (the run has no saved weights yet)")
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise KititansError(f"{path / WEIGHTS}: unreadable weights ({e})") from None
    meta, state = upgrade(meta, state)
    spec = get_family(meta["family"])
    saved = spec.upgrade_config(meta["model"]) if spec.upgrade_config else meta["model"]
    config = config_from_dict(spec.config_cls, saved, what=f"{spec.name} checkpoint", strict=False)
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != config.vocab_size:
        raise KititansError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model has {config.vocab_size}; "
            "the tokenizer files do not belong to this model"
        )
    with torch.device("meta"):
        model = spec.build(config)
    check_tensors(model, state, path)
    tied = alias_pairs(model)
    model = model.to_empty(device="cpu")
    for alias, original in tied:  # to_empty gives each name its own tensor: tie them again
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(original))
    model.load_state_dict(state, strict=False)
    model.init_buffers()  # non-persistent buffers (RoPE tables...) are not in the file
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    model.eval()
    return Checkpoint(path, spec, config, model, tokenizer, meta)


def check_tensors(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = state_dict_names(model)
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    wrong = [
        f"{n} {tuple(state[n].shape)} != {tuple(s)}"
        for n, s in expected.items()
        if n in state and state[n].shape != s
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else "")
            )
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"wrong shape {'; '.join(wrong[:3])}")
        raise KititansError(f"{path / WEIGHTS} does not match its config.json: {'; '.join(parts)}")


def state_dict_names(model: nn.Module) -> dict[str, torch.Size]:
    """Persistent tensor names and shapes as saved (tied aliases removed)."""
    skip = aliases(model)
    return {n: t.shape for n, t in model.state_dict().items() if n not in skip}


def alias_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(alias, original) for parameters registered under a second name (e.g. a tied lm_head)."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


def aliases(model: nn.Module) -> set[str]:
    return {alias for alias, _ in alias_pairs(model)}


# ----------------------------------------------------------------------------- resume state (no pickle)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [[_encode(k, tensors, prefix), _encode(v, tensors, prefix)] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, tensors, prefix) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in train_state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_decode(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def write_tree(folder: str | Path, stem: str, obj: Any) -> None:
    """A nested structure of tensors and plain values (an optimizer state dict...): tensors in
    <stem>.safetensors, the structure in <stem>.json (no pickle); each file atomically."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, "")
    folder = Path(folder)
    with atomic_path(folder / f"{stem}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / f"{stem}.json", structure)


def read_tree(folder: str | Path, stem: str) -> Any:
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / f"{stem}.safetensors"))
    except (SafetensorError, OSError) as e:
        raise KititansError(f"{folder / stem}.safetensors: unreadable ({e})") from None
    return _decode(read_json(folder / f"{stem}.json"), tensors)


def save_train_state(run_dir: str | Path, state: dict[str, Any]) -> None:
    """Format-1 resume state (train_state/ in the run dir); new runs use train/checkpoints.py."""
    with atomic_path(Path(run_dir) / "train_state") as tmp:
        tmp.mkdir()
        write_tree(tmp, "tensors", state)
        (tmp / "tensors.json").rename(tmp / "state.json")


def load_train_state(run_dir: str | Path) -> dict[str, Any]:
    d = Path(run_dir) / "train_state"
    if not (d / "state.json").is_file() or not (d / "tensors.safetensors").is_file():
        raise KititansError(
            f"{run_dir}: no train_state/ to resume from (it is saved every train.save_every steps)"
        )
    return _decode(read_json(d / "state.json"), load_file(str(d / "tensors.safetensors")))
