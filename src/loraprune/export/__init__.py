"""Export: merge LoRA, slice pruned rows and columns, and write the smaller model in a runtime's format.

writer.py is the interface: an ExportRequest, one registered writer per --format, and ``export_model``,
which does what every export shares (merge, check against the trained model, loraprune.json, rename).
slicing.py is format-free (masked LoRA model → smaller dense transformers model). The writers:
transformers_writer.py, a Hugging Face folder: plain when every layer keeps the same widths, else (and for
--format nemotron-nas) a DeciLM folder vLLM loads (nemotron_nas_folder.py; layout: nemotron_nas_layout.py,
loading: nemotron_nas_reader.py, config and modeling code shipped into the folder: configuration_decilm.py,
modeling_decilm.py); gguf_writer.py, a GGUF file for llama.cpp (per-layer widths allowed; checked in
llama.cpp via llamacpp.py). Importing this package registers every writer.
"""

from loraprune.export import gguf_writer, transformers_writer  # noqa: F401  (registers)
from loraprune.export.writer import WRITERS, ExportRequest, ExportWriter, export_model, register_writer

__all__ = ["WRITERS", "ExportRequest", "ExportWriter", "export_model", "register_writer"]
