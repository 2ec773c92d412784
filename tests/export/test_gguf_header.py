"""read_gguf gives what gguf's own GGUFReader gives: every key, value type and tensor, the data as views."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from loraprune.errors import LoraPruneError
from loraprune.export.gguf_header import read_gguf
from loraprune.models.loading import builtin_gguf_path


def assert_same_as_gguf_reader(path) -> None:
    ours, theirs = read_gguf(path), GGUFReader(path)
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]  # the reader's own entries
    assert list(ours.fields) == keys
    for key in keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
        assert ours.fields[key].types == theirs.fields[key].types, key
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes) == (
            reference.name, reference.tensor_type, reference.n_elements, reference.n_bytes)
        assert mine.shape.tolist() == reference.shape.tolist() and mine.shape.dtype == reference.shape.dtype
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        assert np.array_equal(mine.data, reference.data), mine.name


def test_smollm2s_gguf_reads_as_ggufs_reader_reads_it():
    assert_same_as_gguf_reader(builtin_gguf_path())  # 49,152 tokens and merges; Q4_1, Q8_0 and F32 tensors


def test_every_value_type_and_plain_and_quantised_tensors_read_as_ggufs_reader_reads_them(tmp_path):
    path = tmp_path / "all.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_string("general.name", "naïve ✓")
    for name, value_type, value in [("u8", GGUFValueType.UINT8, 7), ("i16", GGUFValueType.INT16, -3),
                                    ("u64", GGUFValueType.UINT64, 2 ** 40), ("f64", GGUFValueType.FLOAT64, 0.1),
                                    ("f32", GGUFValueType.FLOAT32, 1.5), ("flag", GGUFValueType.BOOL, True)]:
        writer.add_key_value(f"test.{name}", value, value_type)
    writer.add_array("test.words", ["a", "", "ünï"])
    writer.add_array("test.scores", [0.5, -1.25, 3.0])
    writer.add_array("test.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("plain.f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("plain.f16", rng.standard_normal((4, 2)).astype(np.float16))
    writer.add_tensor("plain.i32", np.arange(6, dtype=np.int32))
    weights = rng.standard_normal((2, 64)).astype(np.float32)
    writer.add_tensor("quantised.q8_0", quants.quantize(weights, GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert_same_as_gguf_reader(path)
    assert read_gguf(path).get_field("test.words").contents() == ["a", "", "ünï"]


def test_a_cut_off_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(builtin_gguf_path().read_bytes()[:100_000])  # inside the vocabulary
    with pytest.raises(LoraPruneError, match="is not a readable GGUF file"):
        read_gguf(path)
