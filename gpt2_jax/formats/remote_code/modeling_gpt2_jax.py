"""transformers model of gpt2_jax's extended GPT-2 (model_type `gpt2_jax`): remote code.

`python -m gpt2_jax.convert to-hf` writes the models no transformers architecture computes
exactly (learned positions with GQA, a window or no biases; every Mixture-of-Experts model)
under model_type `gpt2_jax`, and copies into the folder this file, configuration_gpt2_jax.py
and gpt2_torch_ref's modules as ref_config.py, ref_model.py, ref_moe.py and ref_loader.py
(their `gpt2_torch_ref.` imports made relative). config.json's `auto_map` names the classes:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-generation", model=folder, trust_remote_code=True)

The network is gpt2_torch_ref's GPT, built from config.json by the reference's own reader
(`ref_loader.config_from_dict`); its parameters are named as model.safetensors names them
(`transformer.*`, and `lm_head.weight` when untied), so from_pretrained loads them by name.
There is no KV cache: each generate() step runs the whole sequence again, which is exact for
learned positions, windows and MoE routing alike, and slow for long outputs. Learned positions
end at `n_positions`. Padding (an attention_mask with zeros) is refused: the reference has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_gpt2_jax import Gpt2JaxConfig
from .ref_loader import config_from_dict
from .ref_model import GPT


class Gpt2JaxForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = Gpt2JaxConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _no_split_modules = ["Block"]
    _supports_cache_class = False  # transformers 4.x: no Cache object is passed in

    def __init__(self, config: Gpt2JaxConfig):
        super().__init__(config)
        gpt = GPT(config_from_dict(config.to_dict()))
        # The reference's modules, under the reference's names; `forward` runs GPT.forward on
        # them (it reads only `cfg`, `transformer` and `lm_head`).
        self.cfg = gpt.cfg
        self.transformer = gpt.transformer
        self.lm_head = gpt.lm_head
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits [B, T, vocab] of token ids [B, T]; with `labels`, the mean next-token
        cross-entropy over the labels that are not -100."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "gpt2_jax's remote code does not support padding (an attention_mask with "
                "zeros); run sequences of different lengths one at a time"
            )
        logits = GPT.forward(self, input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict:
        """The whole sequence at every step (no KV cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
