"""Run a GGUF file in llama.cpp (through the prebuilt ``xllamacpp`` wheel) and read what it computes.

llama.cpp is reached through its server API, in process: greedy tokens with log-probabilities
come from the completion endpoint, per-position hidden states (after the final norm) from the
embeddings endpoint with pooling "none", tokenization from /tokenize.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraprune.errors import LoraPruneError

XLLAMACPP_INSTALL = "pip install xllamacpp"


@dataclass(frozen=True)
class GreedyRun:
    """Tokens llama.cpp chose greedily after a prompt, with its log-probabilities.

    llama.cpp normalises the softmax with a float32 sum over the sorted vocabulary, so on a large
    flat vocabulary its log-probabilities carry an offset of ~1e-4 per step; differences between
    candidates of one step (``top``) are exact logit differences.
    """

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per step: (token, log-probability) of the best candidates
    prefill_tokens_per_second: float  # llama.cpp's own timings
    decode_tokens_per_second: float


class LlamaCpp:
    """A GGUF model loaded in llama.cpp on the CPU: f32 KV cache, flash attention off.

    ``hidden_states`` needs ``embeddings=True`` (llama.cpp then also keeps every position's
    output); a server for timing leaves it off.
    """

    def __init__(self, gguf_path: Path, context: int = 1024, threads: int | None = None,
                 embeddings: bool = False):
        try:
            import xllamacpp
        except ImportError as e:
            raise LoraPruneError(f"running a GGUF file needs xllamacpp; install it with: {XLLAMACPP_INSTALL}") from e
        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_path)
        params.warmup = False
        params.n_ctx = context
        params.n_batch = params.n_ubatch = context  # a whole prompt in one batch: one forward pass
        params.n_parallel = 1
        params.port = 0  # the in-process HTTP listener takes any free port on 127.0.0.1
        params.cache_ram_mib = 0
        threads = threads or os.cpu_count() or 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        # Exactness: a float32 KV cache and the plain attention kernel, as the PyTorch reference.
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.verbosity = -1
        if embeddings:
            params.embedding = True
            params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        try:
            self._server = xllamacpp.Server(params)
        except Exception as e:  # the binding raises RuntimeError or ValueError on a bad file
            raise LoraPruneError(f"llama.cpp cannot load {gguf_path} ({e}); please report this") from e
        self._address = self._server.listening_address

    def close(self) -> None:
        """Stop the server and free the model."""
        self._server = None

    def greedy(self, prompt: list[int], new_tokens: int, candidates: int = 1) -> GreedyRun:
        """Decode ``new_tokens`` greedily after ``prompt`` (token ids, no BOS added)."""
        result = self._server.handle_completions({
            "prompt": [int(t) for t in prompt], "n_predict": new_tokens, "temperature": 0.0,
            "n_probs": candidates, "ignore_eos": True, "cache_prompt": False, "repeat_penalty": 1.0})
        if "choices" not in result:
            raise LoraPruneError(f"llama.cpp refused a completion: {result.get('message', result)}")
        content = result["choices"][0]["logprobs"]["content"]
        timings = result.get("timings", {})
        top = [[(int(t["id"]), float(t["logprob"])) for t in c["top_logprobs"]] for c in content]
        return GreedyRun([int(c["id"]) for c in content], [float(c["logprob"]) for c in content], top,
                         timings.get("prompt_per_second", float("nan")), timings.get("predicted_per_second", float("nan")))

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """Output of the final norm at every position of ``ids``, shape (tokens, hidden), float32."""
        result = self._post("/embeddings", {"content": [[int(t) for t in ids]]})
        return np.asarray(result[0]["embedding"], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids for ``text`` (special tokens not parsed, no BOS)."""
        return [int(t) for t in self._post("/tokenize", {"content": text, "add_special": False})["tokens"]]

    def _post(self, route: str, body: dict):
        request = urllib.request.Request(self._address + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
