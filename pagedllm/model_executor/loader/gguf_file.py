"""A minimal, fast GGUF container parser: metadata, tensor directory, memory-mapped data.

`gguf.GGUFReader` builds a numpy view per metadata array item, which takes seconds for a
50k-token vocabulary; this parser reads the header with `struct` in tens of milliseconds and
leaves dequantization to `gguf.quants`. Every tensor's byte range is checked against the file
size up front, so truncated files fail at open time with a clear error.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagedllm.model_executor.loader.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(slots=True, frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the contiguous (innermost) one
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int
    row_bytes: int  # bytes of one dims[0]-long row

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order, e.g. [out_features, in_features] for a linear weight."""
        return tuple(reversed(self.dims))


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise EOFError("string runs past the end of the file")
        s = bytes(self.buf[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                end = self.pos + size * count
                if end > len(self.buf):
                    raise EOFError("array runs past the end of the file")
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.unpack(_SCALAR_FORMATS[vtype])


class GGUFFile:
    """Parsed header of a GGUF file plus a read-only memory map of its tensor data."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")
        try:
            self._parse(memoryview(self._mmap))
        except (struct.error, EOFError, ValueError, UnicodeDecodeError, KeyError) as e:
            raise ModelLoadError(
                f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}"
            ) from e

    def _parse(self, buf: memoryview) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        cur = _Cursor(buf)
        cur.pos = 4
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {self.version}")
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            raw_infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        self.tensors: list[GGUFTensorInfo] = []
        for name, dims, qtype, rel_offset in raw_infos:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            if dims[0] % block_size != 0:
                raise ValueError(f"tensor {name}: row of {dims[0]} not a multiple of "
                                 f"block size {block_size}")
            row_bytes = dims[0] // block_size * type_size
            nbytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
            offset = data_start + rel_offset
            if offset + nbytes > self.file_size:
                raise EOFError(
                    f"tensor {name} needs bytes {offset}..{offset + nbytes} but the file has "
                    f"{self.file_size}"
                )
            self.tensors.append(
                GGUFTensorInfo(name, dims, qtype, offset, nbytes, row_bytes)
            )

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """Read-only bytes of a tensor, [*shape[:-1], row_bytes] uint8 (a memmap view)."""
        data = self._mmap[info.offset : info.offset + info.nbytes]
        return data.reshape(*info.shape[:-1], info.row_bytes)

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor as float32 in numpy order."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(info.qtype)
        try:
            out = dequantize(self.raw(info), qtype)
        except NotImplementedError as e:
            raise ModelLoadError(f"GGUF tensor {info.name}: {qtype.name} is not supported") from e
        return np.asarray(out, dtype=np.float32).reshape(info.shape)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime: float) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str) -> GGUFFile:
    """A parsed GGUF file, cached per (path, size, mtime) within the process."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ModelLoadError(f"cannot open GGUF file {path}: {e}") from e
    return _open_cached(os.path.abspath(path), st.st_size, st.st_mtime)
