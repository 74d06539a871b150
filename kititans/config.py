"""Run configuration: dataclasses, YAML recipes and `--set key=value` overrides.

Layers, later wins: dataclass defaults < the preset's training hints < recipe file < --set < explicit flags.
Unknown keys and wrongly typed values are errors that name the valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kititans.errors import KititansError


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)  # files, directories, globs, or prepared shards dirs
    dataset: str | None = None  # hub dataset NAME[:CONFIG] (or a local dataset folder), streamed
    split: str = "train"  # the hub dataset's split
    text_field: str = "text"
    val_fraction: float = 0.02
    seed: int = 0
    skip_invalid: bool = False  # skip undecodable/truncated files with a counted warning instead of failing
    builtin_bytes: int = 6_000_000  # size of the built-in corpus when no data is given
    weights: list[float] = field(default_factory=list)  # several prepared datasets: mixture weights
    workers: int = 0  # tokenizer worker processes; 0 = one per CPU core
    dedup: bool = True  # drop exact duplicate documents (by a 64-bit content hash)
    max_docs: int = 0  # stop reading after this many documents (0 = all)
    max_tokens: int = 0  # stop writing after this many tokens (0 = all)
    shard_mb: float = 1024.0  # token shard size cap
    tokenizer_sample_mb: float = 100.0  # the tokenizer's training sample, drawn uniformly while streaming
    tokenizer_read_mb: float = (
        0.0  # draw it from the first N MB; 0 = all of local files, 1000 MB of a hub stream
    )
    character_coverage: float = 0.9995  # SentencePiece: characters covered before falling back to bytes

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise KititansError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        for name in ("workers", "max_docs", "max_tokens"):
            if getattr(self, name) < 0:
                raise KititansError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.shard_mb <= 0 or self.tokenizer_sample_mb <= 0 or self.tokenizer_read_mb < 0:
            raise KititansError(
                "data.shard_mb and data.tokenizer_sample_mb must be > 0, tokenizer_read_mb >= 0"
            )
        if not 0.9 <= self.character_coverage <= 1.0:
            raise KititansError(f"data.character_coverage must be in [0.9, 1], got {self.character_coverage}")
        if self.weights and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise KititansError(f"data.weights must be >= 0 with a positive sum, got {self.weights}")


@dataclass
class TokenizerConfig:
    vocab_size: int = 0  # 0: the preset's vocabulary size
    path: str | None = None  # reuse an existing tokenizer (a run dir or a tokenizer dir)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for 2-D block matrices, AdamW for the rest)
    lr: float = 3e-3  # AdamW learning rate (all params, or embeddings/head/norms with muon)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float = 0.05  # torch.optim.Muon with the "original" shape scaling
    muon_weight_decay: float = 0.01
    muon_momentum: float = 0.95
    # Muon's per-matrix update scale: "original" sqrt(max(1, rows/cols)) (Muon-sized lr, ~0.02-0.05), or
    # "match_rms_adamw" 0.2 sqrt(max(rows, cols)) (Moonlight: an AdamW-sized lr and weight decay carry over)
    muon_scale: str = "original"
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr_ratio

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "muon"))
        _choice("optim.schedule", self.schedule, ("cosine", "wsd", "constant"))
        _choice("optim.muon_scale", self.muon_scale, ("original", "match_rms_adamw"))
        if self.lr <= 0 or self.muon_lr <= 0:
            raise KititansError("optim.lr and optim.muon_lr must be > 0")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    eval_every: int = 250
    eval_batches: int = 16
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA, with a GradScaler)
    compile: str = "auto"  # auto | on | off
    # recompute each block's activations in backward: auto = on for models from 300M parameters
    activation_checkpointing: str = "auto"  # auto | on | off
    threads: int = 0  # CPU threads, 0 = all cores (divided among the ranks on one machine)
    # several devices (torchrun): sequences per optimizer step over all ranks; 0 = batch_size x grad_accum x
    # ranks. Set, it fixes grad_accum = global_batch / (batch_size x ranks), so a resume on another number of
    # devices trains on the same windows
    global_batch: int = 0
    parallel: str = "auto"  # auto (FSDP2 from 300M parameters, else DDP) | none | ddp | fsdp
    dist_timeout: int = 1800  # seconds a collective may wait for a peer before the job stops
    prefetch: bool = True  # draw the next step's batches on a background thread (pinned on CUDA)
    stop_check_every: int = 10  # steps between the ranks' agreement on a stop (SIGTERM, Ctrl-C): 1 sync
    keep: int = 2  # committed checkpoints kept (the newest)
    keep_best: bool = False  # also keep the checkpoint with the best val loss
    # optimizer state in checkpoints: every rank writes its own shard in parallel (train/sharded.py); false:
    # gathered to rank 0 and written as one file (the format before sharding; both resume anywhere)
    checkpoint_shards: bool = True
    log: str = "none"  # none | tensorboard | wandb | trackio (same scalars as metrics.jsonl)
    report: bool = True  # write RUN/report/training.{png,html} at the end (needs matplotlib)
    # the LM loss (train/loss.py): head + loss chunk by chunk, never full fp32 logits; auto = Liger's fused
    # kernel on CUDA when liger-kernel is installed, else chunked
    loss_impl: str = "auto"  # auto | chunked | liger
    loss_chunk: int = 0  # rows (tokens) per loss chunk; 0 = about 8M logits (32 MB fp32) per chunk
    # a resume with other --steps keeps the schedule the run started with; this asks for a new one (it is
    # a launch option: checkpoints record it as false)
    reset_schedule: bool = False

    def __post_init__(self) -> None:
        _choice("train.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        _choice("train.compile", str(self.compile).lower(), ("auto", "on", "off", "true", "false"))
        if isinstance(self.activation_checkpointing, bool):  # a run config written before "auto"
            self.activation_checkpointing = "on" if self.activation_checkpointing else "off"
        ac = str(self.activation_checkpointing).lower()
        _choice("train.activation_checkpointing", ac, ("auto", "on", "off", "true", "false"))
        _choice("train.device", self.device.split(":")[0], ("auto", "cpu", "cuda", "mps"))
        _choice("train.parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        _choice("train.log", self.log, ("none", "tensorboard", "wandb", "trackio"))
        _choice("train.loss_impl", self.loss_impl, ("auto", "chunked", "liger"))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every", "keep",
                     "stop_check_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise KititansError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch < 0 or self.dist_timeout < 1 or self.threads < 0 or self.loss_chunk < 0:
            raise KititansError(
                "train.global_batch, train.threads and train.loss_chunk must be >= 0, train.dist_timeout >= 1"
            )


@dataclass
class SftConfig:
    """Chat fine-tuning (`kititans sft`); the optim/train sections hold its schedule (lower lr, short warmup)."""

    base: str | None = None  # the run being fine-tuned (recorded; `kititans sft RUN` sets it)
    data: list[str] = field(default_factory=list)  # chat files/dirs/globs; empty: the built-in chat examples
    format: str = "auto"  # auto | messages | alpaca | sharegpt | guanaco | text
    builtin_examples: int = 5000  # conversations generated when no data is given
    val_fraction: float = 0.05
    overlong: str = "truncate"  # conversations longer than train.seq_len: truncate (keep the start) | skip
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("sft.format", self.format, ("auto", "messages", "alpaca", "sharegpt", "guanaco", "text"))
        _choice("sft.overlong", self.overlong, ("truncate", "skip"))
        if not 0.0 < self.val_fraction < 0.5:
            raise KititansError(f"sft.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.builtin_examples < 2:
            raise KititansError(f"sft.builtin_examples must be >= 2, got {self.builtin_examples}")


@dataclass
class ContrastiveConfig:
    """Training an "embed" family (train/contrastive.py)."""

    temperature: float = 0.05  # fixed InfoNCE temperature (similarity scale 20)
    val_fraction: float = 0.05  # held-out pairs for retrieval@1 / MRR / margin (at most 2000)

    def __post_init__(self) -> None:
        if not 0.0 < self.temperature <= 1.0:
            raise KititansError(f"contrastive.temperature must be in (0, 1], got {self.temperature}")
        if not 0.0 < self.val_fraction < 0.5:
            raise KititansError(f"contrastive.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class RunConfig:
    family: str = "lite"
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's model fields
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    init: str | None = None  # start from this run's matching weights (an encoder from a Lite run)
    out: str | None = None  # run directory; default runs/<preset>-<timestamp>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = cls()
        apply_overrides(cfg, flatten(d), source="config")
        return cfg


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise KititansError(f"{key} must be one of {', '.join(valid)}; got {value!r}")


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{'optim': {'lr': 1}} -> [('optim.lr', 1)]; the free-form `model` section stays one level deep."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model" and not key.startswith("model."):
            out.extend(flatten(v, key + "."))
        elif isinstance(v, dict) and key == "model":
            out.extend((f"model.{mk}", mv) for mk, mv in v.items())
        else:
            out.append((key, v))
    return out


def config_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every settable dotted key of RunConfig (model.* keys are checked against the family later)."""
    obj = obj if obj is not None else RunConfig()
    keys = []
    for f in dataclasses.fields(obj):
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub):
            keys += config_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str, valid: list[str]) -> KititansError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return KititansError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(valid)}")


def parse_scalar(value: Any) -> Any:
    """A --set string as YAML (numbers, booleans, lists), with "1e-3"-style floats too."""
    if not isinstance(value, str):
        return value
    with contextlib.suppress(yaml.YAMLError):
        value = yaml.safe_load(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert `value` to the annotated field type; strings come from --set and are parsed as YAML."""
    if isinstance(value, str) and typ is not str and typ != (str | None):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value)
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise KititansError(f"{key} must be a list, got {value!r}")
        return [coerce(key, v, args[0]) for v in value]
    if origin is dict or typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise KititansError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise KititansError(f"{key} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KititansError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, bool):  # YAML turns on/off into booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise KititansError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(cfg: RunConfig, items: list[tuple[str, Any]], source: str = "--set") -> RunConfig:
    """Apply dotted-key overrides in order, re-running each section's validation."""
    valid = config_keys()
    touched: set[str] = set()
    for key, value in items:
        if key.startswith("model."):
            name = key.split(".", 1)[1]
            if not name:
                raise _unknown(key, valid)
            cfg.model[name] = parse_scalar(value)
            continue
        if key == "model" and isinstance(value, dict):
            cfg.model.update(value)
            continue
        if key not in valid:
            raise _unknown(key, valid)
        *path, leaf = key.split(".")
        obj = cfg
        for p in path:
            obj = getattr(obj, p)
        hints = typing.get_type_hints(type(obj))
        setattr(obj, leaf, coerce(key, value, hints[leaf]))
        touched.add(path[0] if path else "")
    for section in touched:
        if section and hasattr(getattr(cfg, section), "__post_init__"):
            getattr(cfg, section).__post_init__()
    return cfg


def parse_set(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise KititansError(f"--set expects key=value, got {pair!r} (e.g. --set optim.lr=1e-3)")
        k, v = pair.split("=", 1)
        out.append((k.strip(), v))
    return out


def load_recipe(path: str | Path) -> list[tuple[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise KititansError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KititansError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KititansError(f"{path}: a recipe is a mapping of sections (preset, optim, train, ...)")
    return flatten(data)


def resolve_run_config(layers: list[tuple[str, Any]], preset_hints: Any = None) -> RunConfig:
    """Build a RunConfig from ordered override layers. `preset_hints(family, preset)` returns the preset's
    training defaults as dotted items, applied before the layers."""
    family = next((v for k, v in reversed(layers) if k == "family"), None)
    preset = next((v for k, v in reversed(layers) if k == "preset"), None)
    cfg = RunConfig()
    if preset is not None:
        cfg.preset = str(preset)
    if family is not None:
        cfg.family = str(family)
    if preset_hints is not None:
        fam, hints = preset_hints(cfg.family if family is not None else None, cfg.preset)
        cfg.family = fam
        apply_overrides(cfg, hints, source="preset")
    apply_overrides(cfg, [(k, v) for k, v in layers if k not in ("family", "preset")])
    o, t = cfg.optim, cfg.train
    if o.warmup_steps >= t.steps > 0 and not any(k == "optim.warmup_steps" for k, _ in layers):
        # a preset's warmup longer than a short run: a tenth of the run instead (a warmup the user set and the
        # run never finishes is refused in train/schedule.py)
        logging.getLogger("kititans").warning(
            "optim.warmup_steps %d >= train.steps %d: warming up for %d steps instead",
            o.warmup_steps, t.steps, t.steps // 10,
        )  # fmt: skip
        o.warmup_steps = t.steps // 10
    return cfg
