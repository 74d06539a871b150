"""Titans configuration: the config dataclass, the presets, parameter components (the size table) and
optimizer roles (Muon for the 2-D hidden matrices, AdamW for the rest). The model is in titans.py."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kititans.errors import KititansError
from kititans.models.spec import Preset
from kititans.models.titans.memory_math import ACTIVATIONS

BLOCKS = ("mal", "mac", "mag")
FORGET_BIAS = ("chunk", "token")
REVISION = 2  # the revision of the defaults below (a saved config without `revision` is revision 1)
# what a field a config of revision r did not store means: the behaviour of the code it was saved by. Runs
# saved before `revision` existed computed the pre-paper memory (values normalised too, a forget bias per
# chunk) and the first MAC block; `upgrade_config` fills these in, so they load with the same outputs.
LEGACY: dict[int, dict[str, object]] = {
    1: {
        "mem_norm_v": True,
        "mem_forget_bias": "chunk",
        "mac_attention": "segment",
        "mac_gate": "sigmoid",
        "mac_h_rows": True,
        "mac_keys": "y",
        "mac_values": "y",
        "mac_h_residual": False,
    },
}
CHOICES = {
    "mem_forget_bias": FORGET_BIAS,
    "mem_grad_base": ("chunk", "init"),
    "mac_attention": ("segment", "sliding"),
    "mac_gate": ("sigmoid", "tanh"),
    "mac_keys": ("y", "u"),
    "mac_values": ("y", "u"),
}


def upgrade_config(saved: dict) -> dict:
    """A saved model config (config.json's kititans.model) -> the fields that rebuild the model it was: keys
    it did not store get the values of its own revision, not today's defaults (then `revision` says which)."""
    rev = saved.get("revision", 1)
    out = dict(saved)
    for r, values in LEGACY.items():
        if rev <= r:
            out = {**values, **out}
    out.setdefault("revision", rev)
    return out


@dataclass
class TitansConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 768
    context_length: int = 512  # training length / generation limit; the state itself is fixed-size
    window: int = 128  # sliding attention window: a token sees itself and the window-1 tokens before it
    n_persistent: int = 4  # learned persistent K/V slots per layer, visible to every token
    # how attention and memory combine (blocks.py; runs saved without it are "mal"):
    #   mal  memory as a layer: x += NM(x), then sliding-window attention
    #   mag  memory as a gate: NM and sliding-window attention on the same normalised input, y * sigmoid(NM)
    #   mac  memory as context (the paper's §4.1): attention within segments of `window` tokens over
    #        [persistent ; h = NM frozen at the segment start ; segment]; by default (the mac_* options below)
    #        NM stores the block input u, out = y * (1 + g * tanh(NM(u))) + h
    block: str = "mal"
    memory_layers: list[int] | None = (
        None  # 1-based layer numbers with memory; None: every second (2, 4, ...)
    )
    mem_chunk: int = 16  # C: tokens per memory update
    mem_grad_base: str = (
        "chunk"  # "chunk": B = C (paper); "init": B = None (gradients at W_0, fully parallel)
    )
    mem_hidden_mult: int = 2  # memory MLP head_dim -> mult * head_dim -> head_dim
    mem_act: str = "silu"  # silu | gelu | gelu_tanh
    mem_residual_norm: bool = True  # M(x) = LN(MLP(x)) * (1 + gamma) + x, else M(x) = MLP(x)
    mem_max_lr: float = 0.1  # bound of the data-dependent inner learning rate theta
    mem_max_grad_norm: float = 1.0  # soft clamp of each head's chunk-gradient norm (0: off)
    mem_conv: int = 0  # depthwise causal conv kernel after the memory's q/k/v projections (0: none; paper: 4)
    # l2-normalise the memory's values as well as its keys and queries (paper: no; runs of revision 1: yes)
    mem_norm_v: bool = False
    # initial forget-gate bias: "chunk" -4 per chunk whatever its size (the forget horizon in tokens grows
    # with mem_chunk; revision 1), "token" the same per-token forgetting at any mem_chunk (-4 at 16 tokens)
    mem_forget_bias: str = "token"
    # the MAC block's options (blocks.py, docs/titans.md's ablation table; revision 1 values in LEGACY). The
    # defaults are the set that learnt pass-key beyond attention's reach (96% at 4x the window, where revision
    # 1's mac read 0%): the memory stores the block input u, h also goes onto the residual stream, the gate
    # starts open, and the layers without memory attend over a sliding window
    mac_attention: str = "sliding"  # layers without memory: "segment" attention or a "sliding" window
    mac_gate: str = "tanh"  # y * (1 + g * tanh(N(y))) with a per-channel g = 0 at init, or y * sigmoid(N(y))
    mac_h_rows: bool = True  # the memory's h rows as extra keys/values of the segment attention
    mac_keys: str = "u"  # the memory's keys, gates, queries from the block input "u" or attention output "y"
    mac_values: str = "u"  # the memory's values from "u" or "y"
    mac_h_residual: bool = True  # also add h to the residual stream (x += y * gate + h)
    # 1-based layer numbers with causal attention over the whole context (a K/V cache of context_length
    # rows) instead of the window / segment; None: none
    global_layers: list[int] | None = None
    revision: int = REVISION  # which defaults this config was made with (upgrade_config)
    hyper_streams: int = 1  # hyper-connections: residual streams (1 = plain residual)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.ffn_dim, self.context_length) < 1:
            raise KititansError("titans: sizes must be positive")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise KititansError(f"titans: dim ({self.dim}) must divide by n_heads into an even head_dim")
        if (
            min(self.window, self.mem_chunk, self.mem_hidden_mult, self.hyper_streams) < 1
            or self.n_persistent < 0
        ):
            raise KititansError("titans: window, mem_chunk, mem_hidden_mult, hyper_streams must be >= 1")
        if self.block not in BLOCKS:
            raise KititansError(
                f"titans: unknown model.block {self.block!r}; valid blocks: {', '.join(BLOCKS)}"
            )
        if self.block == "mac" and self.window % self.mem_chunk:
            raise KititansError(
                f"titans: block mac attends within segments of window={self.window} tokens, which must be a "
                f"multiple of mem_chunk={self.mem_chunk} (set model.window or model.mem_chunk)"
            )
        if self.mem_conv < 0 or self.mem_conv == 1:
            raise KititansError(
                f"titans: mem_conv must be 0 (off) or a kernel size >= 2, got {self.mem_conv}"
            )
        for key, valid in CHOICES.items():
            if getattr(self, key) not in valid:
                raise KititansError(
                    f"titans: {key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}"
                )
        if not 1 <= self.revision <= REVISION:
            raise KititansError(
                f"titans: config revision {self.revision!r} is not one this kititans knows (1..{REVISION}): "
                "pip install -U kititans"
            )
        if self.mem_act not in ACTIVATIONS:
            raise KititansError(
                f"titans: mem_act must be one of {', '.join(ACTIVATIONS)}, got {self.mem_act!r}"
            )
        if self.mem_max_lr <= 0 or self.mem_max_grad_norm < 0:
            raise KititansError("titans: mem_max_lr must be > 0 and mem_max_grad_norm >= 0")
        for key in ("memory_layers", "global_layers"):
            layers = getattr(self, key)
            if layers is not None and (
                not isinstance(layers, (list, tuple))
                or any(
                    isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= self.n_layers
                    for i in layers
                )
                or len(set(layers)) != len(layers)
            ):
                raise KititansError(
                    f"titans: {key} must be distinct layer numbers in 1..{self.n_layers}, got {layers!r}"
                )
        both = sorted(i + 1 for i in self.global_set & self.memory_set)
        if self.block == "mac" and both:
            raise KititansError(
                f"titans: block mac keeps its memory layers on segments, but layers {both} are in both "
                "memory_layers and global_layers (make the global layers ones without memory)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def memory_set(self) -> set[int]:
        """0-based indices of the memory layers."""
        if self.memory_layers is None:
            return set(range(1, self.n_layers, 2))
        return {i - 1 for i in self.memory_layers}

    @property
    def global_set(self) -> set[int]:
        """0-based indices of the layers with full causal attention."""
        return {i - 1 for i in self.global_layers or []}


def titans_component(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm head"
    if ".hc." in name:
        return "hyper-connections"
    if ".memory." in name or name.endswith(".gate_scale"):
        if name.endswith((".w1", ".w2", ".gamma")):
            return "memory initial weights"
        if ".proj." in name or ".out." in name:
            return "memory projections"
        return "memory gates+norms"
    if "persistent" in name:
        return "persistent memory"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:
        return "feed-forward"
    return "norms"


# the 2-D hidden matrices: attention, feed-forward, memory projections
MATRICES = ("qkv.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
MATRICES += ("memory.proj.weight", "memory.out.weight")


def titans_param_roles(model: nn.Module) -> dict[str, str]:
    """Muon: the 2-D hidden matrices. AdamW: embedding, head, persistent K/V ("tensor": decayed like the
    projections they stand in for), and as "scalar" (no decay) norms, gates, HC weights and the memory's
    initial weights W_0: W_0 is where the inner optimiser starts, which the memory's own forget gate already
    shrinks; decaying it too would pull every sequence's memory towards an all-zero start."""
    roles = {}
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            roles[name] = "embedding"
        elif name.startswith("lm_head."):
            roles[name] = "head"
        elif "persistent" in name:
            roles[name] = "tensor"
        elif ".hc." not in name and p.ndim == 2 and name.endswith(MATRICES):
            roles[name] = "matrix"
        else:
            roles[name] = "scalar"
    return roles


def titans_param_splits(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Fused matrices as the logical ones they stand for (Muon orthogonalises each block on its own):
    attention's qkv = [q | k | v] and each memory's proj = [keys | values | queries], D rows each."""
    out: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        if name.endswith(("attn.qkv.weight", "memory.proj.weight")) and p.ndim == 2 and p.shape[0] % 3 == 0:
            out[name] = (p.shape[0] // 3,) * 3
    return out


def titans_fp32_modules(model: nn.Module) -> list[nn.Module]:
    """The neural memories: their weights (W_0, projections, gates) enter fp32 memory math, so under mixed
    precision they are kept and read in fp32."""
    return [m for n, m in model.named_modules() if n.endswith(".memory") and m is not None]


_TRAIN_DEBUG = {
    "train.seq_len": 128,
    "train.batch_size": 8,
    "train.steps": 200,
    "train.eval_every": 100,
    "train.save_every": 100,
    "optim.warmup_steps": 20,
}
_500M = dict(
    vocab_size=65024,
    dim=1024,
    n_layers=24,
    n_heads=16,
    ffn_dim=2880,
    context_length=4096,
    window=512,
    mem_chunk=64,
    tie_embeddings=False,
    block="mac",
)
_TRAIN_500M = {"train.seq_len": 2048, "train.batch_size": 8, "train.grad_accum": 4, "train.steps": 100000}
PRESETS = {
    p.name: p
    for p in [
        Preset(
            "titans-debug",
            dict(
                vocab_size=512,
                dim=128,
                n_layers=2,
                n_heads=2,
                ffn_dim=256,
                context_length=256,
                window=32,
                mem_chunk=8,
            ),
            _TRAIN_DEBUG,
            "tests: 0.5M params, head_dim 64, memory on layer 2, window 32, chunk 8",
        ),
        Preset(
            "titans-tiny",
            dict(
                vocab_size=4096,
                dim=256,
                n_layers=4,
                n_heads=4,
                ffn_dim=768,
                context_length=512,
                window=128,
            ),
            {
                "train.seq_len": 256,
                "train.batch_size": 16,
                "train.steps": 1200,
                "train.eval_every": 200,
                "train.save_every": 400,
            },
            "the CPU Titans: Lite tiny's dims with memory on layers 2 and 4, window 128, chunk 16",
        ),
        Preset(
            "titans-500m",
            _500M,
            _TRAIN_500M,
            "the seed's 503M Memory as Context Transformer: block mac (segments of 512), 24 x 1024, memory on "
            "2,4,...,24 (64->128->64), untied (GPU)",
        ),
        Preset(
            "titans-500m-hybrid",
            {**_500M, "global_layers": [3, 7, 11, 15, 19, 23]},
            _TRAIN_500M,
            "titans-500m with every 4th layer (3, 7, ..., 23; none with memory) attending causally over the whole "
            "context (a K/V cache of 4096 rows in those 6 layers), as MobileLLM-Pro / Gemma 2 interleave (GPU)",
        ),
    ]
}
