"""DeciLM (Nemotron-NAS) model for transformers: a Llama whose layers have their own widths.

Written by loraprune and copied into every per-layer folder it exports, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` runs it with plain
transformers + torch. Each layer reads its block config: KV heads (num_attention_heads //
n_heads_in_group), FFN width (intermediate_size), or no attention / no FFN at all (no_op). The
tensor names and shapes are the ones vLLM's nemotron_nas.py loads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_decilm import BlockConfig, DeciLMConfig

# transformers renamed the outputs' past_key_values to cache (5.x); name it as the installed one does.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own KV-head count."""

    def __init__(self, config: DeciLMConfig, block: BlockConfig, cache_index: int):
        super().__init__()
        self.config = config
        self.layer_idx = cache_index  # index among attention layers: no-op layers hold no cache
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = block.attention.n_heads_in_group
        self.num_key_value_heads = self.num_heads // self.num_key_value_groups
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        """Attention output, (batch, tokens, hidden); appends this step's keys and values to ``cache``."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                     eager_attention_forward)
        output, _ = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous())


class DeciLMMLP(nn.Module):
    """SiLU-gated (or the config's activation) FFN of this layer's own width."""

    def __init__(self, config: DeciLMConfig, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMDecoderLayer(nn.Module):
    """A Llama decoder layer whose attention or FFN may be absent (no_op)."""

    def __init__(self, config: DeciLMConfig, block: BlockConfig, cache_index: int):
        super().__init__()
        if not block.attention.no_op:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = DeciLMAttention(config, block, cache_index)
        if not block.ffn.no_op:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, block.ffn.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        if hasattr(self, "self_attn"):
            hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)
        if hasattr(self, "mlp"):
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


def _check_blocks(config: DeciLMConfig) -> None:
    if len(config.block_configs) != config.num_hidden_layers:
        raise ValueError(f"config has {len(config.block_configs)} block_configs for {config.num_hidden_layers} layers")
    for i, block in enumerate(config.block_configs):
        if block.attention.replace_with_linear or block.ffn.replace_with_linear:
            raise ValueError(f"layer {i}: replace_with_linear blocks are not supported by this modeling file")


class DeciLMPreTrainedModel(PreTrainedModel):
    """Weight loading and attention-backend support shared by the DeciLM classes."""

    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]  # noqa: RUF012 (transformers reads a list)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class DeciLMModel(DeciLMPreTrainedModel):
    """The decoder stack: embeddings, per-layer blocks, final norm."""

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        _check_blocks(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        cache_indices = _cache_indices(config.block_configs)
        self.layers = nn.ModuleList([DeciLMDecoderLayer(config, block, index)
                                     for block, index in zip(config.block_configs, cache_indices)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> BaseModelOutputWithPast:
        """Last hidden state and the (updated) KV cache."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, attention_mask=mask,
                                  cache=cache, position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: cache})


def _cache_indices(blocks: list[BlockConfig]) -> list[int]:
    """Each attention layer's slot in the KV cache; the first attention layer holds slot 0."""
    indices, next_index = [], 0
    for block in blocks:
        indices.append(next_index)
        next_index += not block.attention.no_op
    return indices


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    """DeciLM with a language-model head; what the folder's config.json names as its architecture."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits (batch, tokens, vocabulary), the loss when ``labels`` are given, and the KV cache."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
