"""A reference forward pass of a Nemotron-NAS (DeciLM) folder, read from its config and safetensors.

Each layer runs with its own KV-head count and FFN width, as vLLM's DeciLMForCausalLM does; it is
how a written folder is validated without vLLM, and every stored tensor must be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from loraprune.errors import LoraPruneError
from loraprune.export import configuration_decilm
from loraprune.export.configuration_decilm import BlockConfig, DeciLMConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_CODE_NAME = "configuration_decilm.py"


def config_code() -> str:
    """The source of the config class a written folder ships for ``trust_remote_code``."""
    return Path(configuration_decilm.__file__).read_text()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class NemotronNasReference(nn.Module):
    """Logits of a written folder, computed block by block from its block_configs."""

    def __init__(self, config: DeciLMConfig, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.weights = nn.ParameterDict({name.replace(".", "__"): nn.Parameter(t, requires_grad=False)
                                         for name, t in tensors.items()})
        self.rotary = LlamaRotaryEmbedding(config)
        self._check_shapes()

    @classmethod
    def load(cls, folder: Path) -> NemotronNasReference:
        """Read config.json and the safetensors weights of ``folder``."""
        folder = Path(folder)
        config = DeciLMConfig(**json.loads((folder / "config.json").read_text()))
        if len(config.block_configs) != config.num_hidden_layers:
            raise LoraPruneError(f"{folder} has {len(config.block_configs)} block configs for "
                                 f"{config.num_hidden_layers} layers")
        return cls(config, load_file(str(folder / WEIGHTS_NAME))).eval()

    def tensor(self, name: str) -> torch.Tensor:
        return self.weights[name.replace(".", "__")]

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i, block in enumerate(c.block_configs):
            prefix = f"model.layers.{i}"
            if not block.attention.no_op:
                kv_width = c.num_attention_heads // block.attention.n_heads_in_group * c.head_dim
                q_width = c.num_attention_heads * c.head_dim
                shapes.update({f"{prefix}.input_layernorm.weight": (c.hidden_size,),
                               f"{prefix}.self_attn.q_proj.weight": (q_width, c.hidden_size),
                               f"{prefix}.self_attn.k_proj.weight": (kv_width, c.hidden_size),
                               f"{prefix}.self_attn.v_proj.weight": (kv_width, c.hidden_size),
                               f"{prefix}.self_attn.o_proj.weight": (c.hidden_size, q_width)})
            if not block.ffn.no_op:
                width = block.ffn.intermediate_size
                shapes.update({f"{prefix}.post_attention_layernorm.weight": (c.hidden_size,),
                               f"{prefix}.mlp.gate_proj.weight": (width, c.hidden_size),
                               f"{prefix}.mlp.up_proj.weight": (width, c.hidden_size),
                               f"{prefix}.mlp.down_proj.weight": (c.hidden_size, width)})
        return shapes

    def _check_shapes(self) -> None:
        expected = self._expected_shapes()
        stored = {name.replace("__", "."): tuple(p.shape) for name, p in self.weights.items()}
        if stored != expected:
            wrong = sorted(set(stored.items()) ^ set(expected.items()))[:4]
            raise LoraPruneError(f"the folder's tensors do not match its block_configs (e.g. {wrong})")

    def _attention(self, x: torch.Tensor, i: int, block: BlockConfig, position_embeddings) -> torch.Tensor:
        c, prefix = self.config, f"model.layers.{i}.self_attn"
        batch, tokens, _ = x.shape
        kv_heads = c.num_attention_heads // block.attention.n_heads_in_group

        def heads(name: str, count: int) -> torch.Tensor:
            return F.linear(x, self.tensor(f"{prefix}.{name}.weight")).view(batch, tokens, count, c.head_dim).transpose(1, 2)

        q, k, v = heads("q_proj", c.num_attention_heads), heads("k_proj", kv_heads), heads("v_proj", kv_heads)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        # KV head j serves query heads j·g … j·g+g−1, as in vLLM and transformers (repeat_interleave).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(batch, tokens, -1), self.tensor(f"{prefix}.o_proj.weight"))

    def _ffn(self, x: torch.Tensor, i: int) -> torch.Tensor:
        prefix = f"model.layers.{i}.mlp"
        gate = ACT2FN[self.config.hidden_act](F.linear(x, self.tensor(f"{prefix}.gate_proj.weight")))
        return F.linear(gate * F.linear(x, self.tensor(f"{prefix}.up_proj.weight")),
                        self.tensor(f"{prefix}.down_proj.weight"))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        """Logits (batch, tokens, vocabulary) in the weights' dtype."""
        c = self.config
        hidden = F.embedding(input_ids, self.tensor("model.embed_tokens.weight"))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        position_embeddings = self.rotary(hidden, positions)
        for i, block in enumerate(c.block_configs):
            prefix = f"model.layers.{i}"
            if not block.attention.no_op:
                normed = _rms_norm(hidden, self.tensor(f"{prefix}.input_layernorm.weight"), c.rms_norm_eps)
                hidden = hidden + self._attention(normed, i, block, position_embeddings)
            if not block.ffn.no_op:
                normed = _rms_norm(hidden, self.tensor(f"{prefix}.post_attention_layernorm.weight"), c.rms_norm_eps)
                hidden = hidden + self._ffn(normed, i)
        hidden = _rms_norm(hidden, self.tensor("model.norm.weight"), c.rms_norm_eps)
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        return SimpleNamespace(logits=F.linear(hidden, self.tensor(head)))
