"""Fixtures shared by the export tests."""

# `written`: a DeciLM folder with different heads, KV heads and FFN per layer and two no-op blocks.
from tests.export.test_nemotron_nas_writer import written  # noqa: F401
