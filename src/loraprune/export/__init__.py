"""Export: merge LoRA, slice pruned rows and columns, and write the smaller model in a runtime's format.

writer.py is the interface: an ExportRequest, one registered writer per --format, and ``export_model``,
which does what every export shares (merge, check against the trained model, loraprune.json, rename).
slicing.py is format-free (masked LoRA model → smaller dense transformers model).
transformers_writer.py writes a standard Hugging Face checkpoint (one width for all layers),
gguf_writer.py a GGUF file for llama.cpp (per-layer widths allowed; checked in llama.cpp via llamacpp.py).
Importing this package registers every writer.
"""

from loraprune.export import gguf_writer, transformers_writer  # noqa: F401  (registers)
from loraprune.export.writer import WRITERS, ExportRequest, ExportWriter, export_model, register_writer

__all__ = ["WRITERS", "ExportRequest", "ExportWriter", "export_model", "register_writer"]
