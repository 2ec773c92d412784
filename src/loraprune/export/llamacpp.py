"""Run a GGUF file in llama.cpp (through the prebuilt ``xllamacpp`` wheel) and read what it computes.

llama.cpp is reached through its server API, in a child process that can always be killed:
greedy tokens with log-probabilities come from the completion endpoint, per-position hidden states
(after the final norm) from the embeddings endpoint with pooling "none", tokenization from /tokenize.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
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

    llama.cpp runs in a child process that ``close`` kills: in process, a Ctrl-C during a
    completion left the server's destructor joining its thread for ever. ``hidden_states`` needs
    ``embeddings=True`` (llama.cpp then also keeps every position's output); a server for timing
    leaves it off.
    """

    def __init__(self, gguf_path: Path, context: int = 1024, threads: int | None = None,
                 embeddings: bool = False):
        if importlib.util.find_spec("xllamacpp") is None:
            raise LoraPruneError(f"running a GGUF file needs xllamacpp; install it with: {XLLAMACPP_INSTALL}")
        settings = {"path": str(gguf_path), "context": context, "threads": threads or os.cpu_count() or 1,
                    "embeddings": embeddings}
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very loraprune
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        # Its own session: a Ctrl-C at the terminal reaches only this process, which then kills it.
        self._process = subprocess.Popen([sys.executable, "-c", CHILD_ENTRY, json.dumps(settings)], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, start_new_session=True)
        try:
            reply = self._process.stdout.readline()
        except BaseException:
            self.close()
            raise
        answer = json.loads(reply) if reply.startswith("{") else {"error": f"exit code {self._process.wait()}"}
        if "address" not in answer:
            self.close()
            raise LoraPruneError(f"llama.cpp cannot load {gguf_path} ({answer['error']}); please report this")
        self._address = answer["address"]

    def close(self) -> None:
        """Stop llama.cpp and free the model, at once (the process holds nothing that needs saving)."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process.stdin.close()
        self._process.stdout.close()

    def greedy(self, prompt: list[int], new_tokens: int, candidates: int = 1,
               repeat_penalty: float | None = 1.0) -> GreedyRun:
        """Decode ``new_tokens`` greedily after ``prompt`` (token ids, no BOS added); ``repeat_penalty`` None
        leaves it to llama.cpp's default, which a file's ``general.sampling.penalty_repeat`` sets."""
        penalty = {} if repeat_penalty is None else {"repeat_penalty": repeat_penalty}
        result = self._post("/v1/completions", {
            "prompt": [int(t) for t in prompt], "n_predict": new_tokens, "temperature": 0.0,
            "n_probs": candidates, "ignore_eos": True, "cache_prompt": False, **penalty})
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


CHILD_ENTRY = "from loraprune.export.llamacpp import serve; serve()"


def serve() -> None:
    """The child process: load ``argv[1]``'s settings in llama.cpp's server, print its address as
    JSON, and serve until the parent closes stdin or kills it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this ends
    import xllamacpp

    settings = json.loads(sys.argv[1])
    params = xllamacpp.CommonParams()
    params.model.path = settings["path"]
    params.warmup = False
    params.n_ctx = settings["context"]
    params.n_batch = params.n_ubatch = settings["context"]  # a whole prompt in one batch: one forward pass
    params.n_parallel = 1
    params.port = 0  # the HTTP listener takes any free port on 127.0.0.1
    params.cache_ram_mib = 0
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = settings["threads"]
    # Exactness: a float32 KV cache and the plain attention kernel, as the PyTorch reference.
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.verbosity = -1
    if settings["embeddings"]:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
    try:
        server = xllamacpp.Server(params)
    except (RuntimeError, ValueError) as e:  # what the binding raises on a bad file
        print(json.dumps({"error": str(e)}), flush=True)
        os._exit(1)
    print(json.dumps({"address": server.listening_address}), flush=True)
    sys.stdin.read()
    os._exit(0)  # never run the server's destructor: it joins threads
