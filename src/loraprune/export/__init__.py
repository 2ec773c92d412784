"""Export: merge LoRA, slice pruned rows and columns, and write the smaller model in a runtime's format.

slicing.py is format-free (masked LoRA model → smaller dense transformers model); each writer takes
that model and writes one format, validating it before the folder is put in place:
transformers_writer.py writes a standard Hugging Face checkpoint (one width for all layers),
gguf_writer.py a GGUF file for llama.cpp (per-layer widths allowed; checked in llama.cpp via llamacpp.py),
nemotron_nas_writer.py per-layer widths for vLLM from the merged model and the masks (layout:
nemotron_nas_layout.py, loading: nemotron_nas_reader.py, config and modeling code shipped into the folder:
configuration_decilm.py, modeling_decilm.py).
"""
