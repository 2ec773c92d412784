"""Keep other libraries' messages that do not concern the user off the terminal; show a repeated one once."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

# bitsandbytes' optional CPU kernel package: its absence changes neither results nor anything the user can act on.
IRRELEVANT_LOG_MESSAGES = ("Failed to load CPU gemm_4bit_forward",)


class OncePerMessage(logging.Filter):
    """Let each distinct message through once (bitsandbytes logs the same cast on every matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """True for a message that matters and has not been shown yet."""
        text = record.getMessage()
        if text.startswith(IRRELEVANT_LOG_MESSAGES) or text in self.seen:
            return False
        self.seen.add(text)
        return True


def quiet_third_party(needs_bitsandbytes: bool, progress_bars: bool = True) -> None:
    """Silence library noise for one CLI command; without ``needs_bitsandbytes`` it is not even imported.

    Without ``progress_bars`` (--no-progress) other libraries' bars go too (GGUF conversion, loading
    and writing weights): tqdm reads TQDM_DISABLE as its default, and loraprune's own bars pass
    ``disable`` explicitly.
    """
    if not progress_bars:
        os.environ["TQDM_DISABLE"] = "1"
    if not needs_bitsandbytes and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # peft imports it when installed: 1.7 s and a warning for nothing
    bnb_logger = logging.getLogger("bitsandbytes")
    if not any(isinstance(f, OncePerMessage) for h in bnb_logger.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.addFilter(OncePerMessage())
        bnb_logger.addHandler(handler)
        bnb_logger.propagate = False
    # PEFT reads the deprecated property; nothing the user does can change it.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


# torch 2.13's profiler (Kineto) writes "USDT:... profiler_start/stop" to the terminal on every use.
IRRELEVANT_STDERR_PREFIXES = ("USDT:",)


@contextlib.contextmanager
def filtered_stderr(prefixes: tuple[str, ...] = IRRELEVANT_STDERR_PREFIXES) -> Iterator[None]:
    """Hold what C++ code writes to file descriptor 2 and pass on every line but those with ``prefixes``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(prefixes)]
            sys.stderr.write("".join(kept))
