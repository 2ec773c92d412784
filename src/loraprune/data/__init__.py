"""Data: text corpora by name, their tokenization and packing into blocks, and the training stream.

corpora.py finds and reads a text; tokens.py turns it into (n_blocks, seq_len) token ids;
sampling.py serves those blocks as a deterministic, resumable, sharded stream of batches.
"""

from loraprune.data.corpora import AUSTEN_TRAIN, AUSTEN_VALIDATION, DATA_NAMES, find_austen_dir, load_text
from loraprune.data.tokens import check_packing_args, token_blocks, tokenize, tokenize_cached

__all__ = ["AUSTEN_TRAIN", "AUSTEN_VALIDATION", "DATA_NAMES", "check_packing_args", "find_austen_dir",
           "load_text", "token_blocks", "tokenize", "tokenize_cached"]
