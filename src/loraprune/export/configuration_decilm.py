"""Config class of a Nemotron-NAS (DeciLM) folder written by loraprune; copied into that folder.

Self-contained (transformers only), loaded with ``trust_remote_code``. Unlike Nemotron-51B's own
config, an FFN block states its width as ``intermediate_size``, which vLLM's DeciLM reads when a
block has no ``ffn_mult``; any width is allowed, not only multiples of 256.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention: skipped (no_op) or with num_attention_heads // n_heads_in_group KV heads."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None


@dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN: skipped (no_op) or of width intermediate_size."""

    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None


@dataclass(frozen=True)
class BlockConfig:
    """One decoder layer."""

    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, block: dict) -> BlockConfig:
        return cls(AttentionConfig(**block["attention"]), FFNConfig(**block["ffn"]))


class DeciLMConfig(PretrainedConfig):
    """A Llama with per-layer KV-head counts and FFN widths (block_configs)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, hidden_size: int = 4096,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, head_dim: int | None = None,
                 vocab_size: int = 32000, hidden_act: str = "silu", rms_norm_eps: float = 1e-5,
                 max_position_embeddings: int = 2048, rope_theta: float = 10000.0,
                 rope_parameters: dict | None = None, tie_word_embeddings: bool = False,
                 attention_bias: bool = False, mlp_bias: bool = False, use_cache: bool = True, **kwargs):
        self.block_configs = [block if isinstance(block, BlockConfig) else BlockConfig.from_dict(block)
                              for block in block_configs or []]
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.vocab_size = vocab_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": rope_theta}
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> dict:
        as_dict = super().to_dict()
        as_dict["block_configs"] = [dataclasses.asdict(block) for block in self.block_configs]
        return as_dict
