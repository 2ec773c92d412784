"""A GGUF file's metadata and tensor table, read in one pass.

gguf's ``GGUFReader`` builds numpy views of every part of every field: for SmolLM2's 49,152-token
vocabulary about 900,000 of them, seconds per file, paid by every GGUF export (the tokenizer keys
copied from the source file, the written file read back) and by ``info`` and ``bench``. This reads
the same header with ``struct`` and maps only the tensors' data; ``read_gguf`` answers the parts of
``GGUFReader``'s interface loraprune uses (``fields``, ``get_field``, ``contents()``, ``tensors``),
with the same values, shapes and views.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    quant_shape_to_byte_shape,
)

from loraprune.errors import LoraPruneError

_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
# Tensor types gguf's reader shows as arrays of their own numbers; every other type is shown as bytes.
_PLAIN_TENSORS = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                  GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                  GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                  GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFField:
    value: Any
    types: list[GGUFValueType]  # [type], or [ARRAY, item type] as gguf's ReaderField has them

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # GGUF's order, fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data: np.ndarray  # a read-only view of the file, shaped as gguf's ReaderTensor.data


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensor]

    def get_field(self, key: str) -> GGUFField | None:
        return self.fields.get(key)


class _Cursor:
    def __init__(self, data: np.ndarray) -> None:
        self.buffer, self.offset = memoryview(data), 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start, self.offset = self.offset, self.offset + length
        return str(self.buffer[start:self.offset], encoding="utf-8")

    def value(self, value_type: GGUFValueType) -> tuple[Any, list[GGUFValueType]]:
        if value_type == GGUFValueType.STRING:
            return self.string(), [value_type]
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])[0], [value_type]
        if value_type != GGUFValueType.ARRAY:
            raise ValueError(f"unknown GGUF value type {value_type}")
        item_type, count = GGUFValueType(self.unpack("I")[0]), self.unpack("Q")[0]
        if item_type in _SCALARS:  # one call for the whole array: scores and token types are vocabulary-long
            items = list(self.unpack(f"{count}{_SCALARS[item_type]}"))
            return items, [value_type, item_type]
        if item_type == GGUFValueType.STRING:
            return [self.string() for _ in range(count)], [value_type, item_type]
        raise ValueError("nested GGUF arrays are not supported")


def read_gguf(path: str | Path) -> GGUFHeader:
    """Every metadata key of ``path`` and its tensors (name, type, shape, a view of the data)."""
    data = np.memmap(path, mode="r")
    cursor = _Cursor(data)
    try:
        magic, version = cursor.unpack("II")
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError("not a little-endian GGUF file of version 2 or 3")
        tensor_count, field_count = cursor.unpack("QQ")
        fields = {}
        for _ in range(field_count):
            key = cursor.string()
            fields[key] = GGUFField(*cursor.value(GGUFValueType(cursor.unpack("I")[0])))
        table = []
        for _ in range(tensor_count):
            name = cursor.string()
            (dimensions,) = cursor.unpack("I")
            shape = cursor.unpack(f"{dimensions}Q")
            tensor_type, offset = cursor.unpack("IQ")
            table.append((name, shape, GGMLQuantizationType(tensor_type), offset))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise LoraPruneError(f"{path} is not a readable GGUF file ({error})") from error
    alignment = fields["general.alignment"].value if "general.alignment" in fields else GGUF_DEFAULT_ALIGNMENT
    start = -(-cursor.offset // alignment) * alignment
    return GGUFHeader(fields, [_tensor(data, start, *entry) for entry in table])


def _tensor(data: np.ndarray, start: int, name: str, shape: tuple[int, ...], tensor_type: GGMLQuantizationType,
            offset: int) -> GGUFTensor:
    elements = int(np.prod(shape))
    dims = tuple(reversed(shape))
    if tensor_type in _PLAIN_TENSORS:
        item, count = _PLAIN_TENSORS[tensor_type], elements
    else:
        block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
        item, count, dims = np.uint8, elements * block_bytes // block_size, quant_shape_to_byte_shape(dims, tensor_type)
    begin = start + offset
    view = data[begin:begin + count * np.dtype(item).itemsize].view(item).reshape(dims)
    return GGUFTensor(name, tensor_type, np.array(shape, dtype=np.uint64), elements, view.nbytes, view)
