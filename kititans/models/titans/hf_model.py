"""The transformers classes of a Titans run's remote-code file. hf.py pastes this module, its kititans
imports taken out, after the model code into RUN/modeling_titans.py; kititans itself never imports it (only
tests do, with transformers installed).

TitansForCausalLM is a PreTrainedModel whose modules are a TitansModel's (the same names, so the run's
model.safetensors loads as it is) and whose methods are TitansModel's own functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from kititans.models.titans.config import TitansConfig, upgrade_config
from kititans.models.titans.model import TitansModel


class TitansHFConfig(PretrainedConfig):
    """config.json of a Titans run: the model's own fields are under "kititans" -> "model"."""

    model_type = "kititans-titans"

    def __init__(self, kititans: dict[str, Any] | None = None, **kwargs: Any):
        self.kititans = kititans or {}
        super().__init__(**kwargs)

    def titans_config(self) -> TitansConfig:
        fields = {f.name for f in dataclasses.fields(TitansConfig)}
        saved = upgrade_config(self.kititans.get("model", {}))  # a run saved before a default changed
        return TitansConfig(**{k: v for k, v in saved.items() if k in fields})


class TitansForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TitansHFConfig
    base_model_prefix = "titans"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["TitansLayer"]

    def __init__(self, config: TitansHFConfig):
        super().__init__(config)
        cfg = config.titans_config()
        self.titans_cfg = cfg  # what TitansModel's methods read as self.cfg
        # the embedding and the head share one matrix when the run ties them (it stores it once)
        self._tied_weights_keys = {"lm_head.weight": "embed.weight"} if cfg.tie_embeddings else {}
        self.build(cfg)
        self.init_buffers()
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from the run's model.safetensors."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def _real_buffers(self) -> None:
        """The RoPE tables are not in the weights file, and loading may leave them unset (on the meta device,
        or allocated empty): refill them unless they hold the right frequencies."""
        cfg, dev = self.cfg, self.embed.weight.device
        want = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
        )
        have = self.rope_inv_freq
        if have.device.type == "meta" or have.device != dev or not torch.equal(have, want.to(dev)):
            self.rope_inv_freq = torch.empty(cfg.head_dim // 2, device=dev)
            self.rope_cos = torch.empty(cfg.context_length, cfg.head_dim, device=dev)
            self.rope_sin = torch.empty(cfg.context_length, cfg.head_dim, device=dev)
            self.init_buffers()

    @property
    def cfg(self) -> TitansConfig:
        return self.titans_cfg

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **_: Any
    ) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, V), the whole sequence (no padding: every row is one sequence
        from its start; a mask with zeros is refused)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Titans reads every token in order: left or right padding is not supported")
        self._real_buffers()
        logits = TitansModel.forward(self, input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, **_: Any) -> dict[str, Any]:
        """generate() without a transformers cache: every step reads the whole sequence."""
        return {"input_ids": input_ids}

    @torch.no_grad()
    def titans_generate(
        self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None
    ) -> Tensor:
        """Greedy decoding over the fixed-size state (what kititans does): one call per new token."""
        self._real_buffers()
        state = self.new_state(input_ids.shape[0])
        logits = TitansModel.forward(self, input_ids, state=state)[:, -1]
        out = [input_ids]
        for _ in range(max_new_tokens):
            tok = logits.argmax(-1, keepdim=True)
            out.append(tok)
            if eos_token_id is not None and bool((tok == eos_token_id).all()):
                break
            logits = TitansModel.forward(self, tok, state=state)[:, -1]
        return torch.cat(out, 1)


# the model's own methods (its forward is reached as TitansModel.forward(self, ...))
for _name in (
    "build", "init_buffers", "fuse_for_inference", "kinds", "state_spec", "new_state", "_state_names",
    "state_to_tensors", "_layer_states", "state_from_tensors", "_rope", "ctx", "_run", "step_io", "step",
):  # fmt: skip
    setattr(TitansForCausalLM, _name, TitansModel.__dict__[_name])
