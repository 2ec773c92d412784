"""Models: one declarative spec per architecture family, and loading a model in any form users give.

specs.py says where each family keeps its layers and projections; loading.py turns a name, folder,
GGUF file or hub id into a transformers model and tokenizer.
"""

from loraprune.models.specs import (
    ArchSpec,
    count_parameters,
    decoder_layers,
    projection_biases,
    spec_for,
    supported_model_types,
    unwrap,
)

__all__ = ["ArchSpec", "count_parameters", "decoder_layers", "projection_biases", "spec_for", "supported_model_types", "unwrap"]
