"""A GGUF file's layout, checked against the file's size before gguf's reader is let near it.

gguf's reader believes every count and length it reads: a 38-byte file claiming an array of 2^61
elements sends it looping and allocating without end, and a truncated file gives short tensors or an
IndexError. `check_layout` walks the same structure (header, metadata, tensor descriptions, tensor data)
with every count and length bounded by the bytes left in the file, reading only the header, so a crafted,
truncated or corrupt file is refused in one line naming the file and what is wrong with it.
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from scratchlm.errors import UserError

VERSIONS = (2, 3)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_UINT32, _STRING, _ARRAY = 4, 8, 9
_MAX_DIMS = 4           # GGML_MAX_DIMS
_MAX_NESTING = 8        # arrays of arrays: llama.cpp writes none; the bound keeps the walk's recursion shallow
_SMALLEST_ENTRY = 8 + 4 + 1         # key length, value type, a one-byte value
_SMALLEST_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
_SMALLEST_ELEMENT = {_STRING: 8, _ARRAY: 4 + 8}
_DEFAULT_ALIGNMENT = 32


class _Cursor:
    """A read position in the file that refuses to move past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.order = buf, path, 0, "<"

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str):
        raise UserError(f"{self.path}: {what}")

    def skip(self, n: int, what: str) -> int:
        if n > self.left:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file ends {self.left} bytes later "
                      f"(truncated or corrupt)")
        start, self.pos = self.pos, self.pos + n
        return start

    def number(self, fmt: str, what: str) -> int:
        start = self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def text(self, what: str) -> str:
        n = self.number("Q", f"the length of {what}")
        start = self.skip(n, what)
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8 text")

    def room(self, count: int, each: int, what: str) -> None:
        """Refuse `count` items that could not fit in the rest of the file even at `each` bytes apiece."""
        if count * each > self.left:
            self.fail(f"it claims {count} {what}, which would take at least {count * each} bytes, but the file "
                      f"ends {self.left} bytes later (truncated or corrupt)")


def check_layout(path: Path, tensor_types: dict[int, tuple[int, int]]) -> None:
    """Raise a UserError if `path` is not a GGUF file whose every count, length and offset fits inside it.
    `tensor_types` maps each tensor type gguf knows to its (block size, bytes per block)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 4:
        raise UserError(f"{path} is {size} bytes, too short for a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _walk(_Cursor(buf, path), tensor_types)


def _walk(c: _Cursor, tensor_types: dict[int, tuple[int, int]]) -> None:
    if bytes(c.buf[:4]) != b"GGUF":
        c.fail("not a GGUF file (it does not start with 'GGUF')")
    c.pos = 4
    version = c.number("I", "the version")
    if version & 0xFFFF == 0:  # a file written on a big-endian machine
        c.order = ">"
        version = struct.unpack_from(">I", c.buf, 4)[0]
    if version not in VERSIONS:
        c.fail(f"GGUF version {version} is not supported (scratchlm reads versions {' and '.join(map(str, VERSIONS))})")
    n_tensors = c.number("Q", "the tensor count")
    n_entries = c.number("Q", "the metadata count")
    c.room(n_entries, _SMALLEST_ENTRY, "metadata entries")
    c.room(n_tensors, _SMALLEST_TENSOR, "tensors")

    alignment, keys = _DEFAULT_ALIGNMENT, set()
    for i in range(n_entries):
        key = c.text(f"the key of metadata entry {i}")
        if key in keys:
            c.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        kind = c.number("I", f"the type of {key}")
        if key == "general.alignment" and kind == _UINT32:
            alignment = c.number("I", f"the value of {key}")
        else:
            _skip_value(c, kind, key, 0)
    if alignment == 0 or alignment & (alignment - 1):
        c.fail(f"general.alignment = {alignment} is not a power of two")

    tensors, names = [], set()
    for i in range(n_tensors):
        name = c.text(f"the name of tensor {i}")
        if name in names:
            c.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = c.number("I", f"the dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            c.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {_MAX_DIMS}")
        dims = [c.number("Q", f"the dimensions of {name}") for _ in range(n_dims)]
        kind = c.number("I", f"the type of {name}")
        offset = c.number("Q", f"the data offset of {name}")
        if kind not in tensor_types:
            c.fail(f"tensor {name!r} has type {kind}, which no GGUF reader knows")
        if 0 in dims:
            c.fail(f"tensor {name!r} has a dimension of 0 ({dims})")
        block, block_bytes = tensor_types[kind]
        if dims[0] % block:
            c.fail(f"tensor {name!r} has rows of {dims[0]}, not a multiple of its type's block of {block}")
        tensors.append((name, math.prod(dims) // block * block_bytes, offset))

    data_start = -(-c.pos // alignment) * alignment
    data_size = max(0, len(c.buf) - data_start)
    for name, n_bytes, offset in tensors:
        if offset + n_bytes > data_size:
            c.fail(f"tensor {name!r} needs bytes {offset} to {offset + n_bytes} of the tensor data, but the file "
                   f"holds {data_size} (truncated or corrupt)")


def _skip_value(c: _Cursor, kind: int, key: str, depth: int) -> None:
    if kind in _SCALAR_SIZE:
        c.skip(_SCALAR_SIZE[kind], f"the value of {key}")
    elif kind == _STRING:
        c.skip(c.number("Q", f"the length of {key}"), f"the text of {key}")
    elif kind == _ARRAY:
        if depth == _MAX_NESTING:
            c.fail(f"{key} nests arrays more than {_MAX_NESTING} deep")
        item = c.number("I", f"the element type of {key}")
        count = c.number("Q", f"the length of {key}")
        if item in _SCALAR_SIZE:
            c.skip(count * _SCALAR_SIZE[item], f"array {key} of {count} elements")
        elif item in _SMALLEST_ELEMENT:
            c.room(count, _SMALLEST_ELEMENT[item], f"elements in {key}")
            for _ in range(count):
                _skip_value(c, item, key, depth + 1)
        else:
            c.fail(f"{key} is an array of value type {item}, which GGUF does not define")
    else:
        c.fail(f"{key} has value type {kind}, which GGUF does not define")
