"""A small safetensors reader: header parsing and zero-copy numpy views through `np.memmap`.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
buffer; offsets are relative to the start of that buffer. We read it ourselves (not through the
`safetensors` package) so every dtype, fp8 and e8m0 included, comes back as a numpy view without a
torch round trip, and so a broken file fails with the file and tensor named.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from atom_jax.weights.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype string -> numpy dtype of one stored element
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# "F4" (torch.float4_e2m1fn_x2) stores two e2m1 codes per byte, low nibble first; the header shape
# counts fp4 elements. We expose it as packed uint8 with the last dimension halved.
PACKED_FP4 = "F4"

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit too


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]  # as in the header
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def view_shape(self) -> tuple[int, ...]:
        """Shape of the numpy view `SafetensorsFile.get` returns (F4: last dim packed in pairs)."""
        if self.dtype == PACKED_FP4:
            return self.shape[:-1] + (self.shape[-1] // 2,)
        return self.shape


def _expected_nbytes(path: str, name: str, dtype: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if dtype == PACKED_FP4:
        if not shape or shape[-1] % 2:
            raise CheckpointError(path, name, f"F4 tensor needs an even last dimension, shape is {list(shape)}")
        return n // 2
    if dtype not in DTYPES:
        raise CheckpointError(path, name, f"unknown dtype {dtype!r} (known: {sorted(DTYPES) + [PACKED_FP4]})")
    return n * DTYPES[dtype].itemsize


class SafetensorsFile:
    """Header parsed and validated on construction; data mapped lazily, one `np.memmap` per file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: np.memmap | None = None
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(self.path, None, f"file is {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise CheckpointError(self.path, None, f"header length {n} is implausible (corrupt file?)")
                if 8 + n > size:
                    raise CheckpointError(self.path, None,
                                          f"truncated: header says {n} bytes of JSON but the file has {size} bytes")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(self.path, None, f"cannot read: {e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(self.path, None, f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(self.path, None, "header JSON is not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(self.path, None, "__metadata__ is not an object")
        self.metadata: dict = meta
        self.header_size = 8 + n
        self.file_size = size
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry)
        # file order = data order, so callers that walk `names()` read the file front to back
        self.tensors: dict[str, TensorInfo] = dict(sorted(tensors.items(), key=lambda kv: kv[1].begin))

    def _parse_entry(self, name: str, entry) -> TensorInfo:
        if not isinstance(entry, dict):
            raise CheckpointError(self.path, name, "header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise CheckpointError(self.path, name, f"missing or non-string dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(self.path, name, f"bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise CheckpointError(self.path, name, f"bad data_offsets {offsets!r}")
        shape = tuple(shape)
        want = _expected_nbytes(self.path, name, dtype, shape)
        span = offsets[1] - offsets[0]
        if span != want:
            raise CheckpointError(self.path, name, f"byte span {span} does not match dtype {dtype} and shape "
                                                   f"{list(shape)} ({want} bytes)")
        begin, end = self.header_size + offsets[0], self.header_size + offsets[1]
        if end > self.file_size:
            raise CheckpointError(self.path, name, f"truncated file: the tensor's data ends at byte {end} but the "
                                                   f"file has {self.file_size} bytes")
        return TensorInfo(name, dtype, shape, begin, end)

    # ---- access ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.path, name, "no such tensor in this file") from None

    def get(self, name: str) -> np.ndarray:
        """Read-only view of the stored data (no copy; pages are read on access)."""
        t = self.info(name)
        dtype = np.dtype(np.uint8) if t.dtype == PACKED_FP4 else DTYPES[t.dtype]
        if t.nbytes == 0:
            return np.zeros(t.view_shape, dtype)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[t.begin:t.end].view(dtype).reshape(t.view_shape)

    def close(self):
        """Drop our mapping (views already handed out keep theirs alive)."""
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def list_safetensors(path: str | os.PathLike) -> tuple[list[str], dict[str, str] | None]:
    """(files, weight_map or None) for a checkpoint directory or a single .safetensors file.

    With `model.safetensors.index.json` the files are those its weight_map names (each must exist);
    otherwise every `*.safetensors` in the directory, sorted by name.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path], None
    if not os.path.isdir(path):
        raise CheckpointError(path, None, "no such checkpoint file or directory")
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(index, None, f"cannot read the index ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index, None, "index has no weight_map")
        files: dict[str, str] = {}
        root = os.path.realpath(path)
        for tensor, fname in weight_map.items():
            full = os.path.join(path, fname) if isinstance(fname, str) else None
            if full is None or os.path.isabs(fname) or \
                    os.path.commonpath([root, os.path.realpath(full)]) != root:
                raise CheckpointError(index, tensor, f"the index puts it in {fname!r}, outside the "
                                      "model directory (weight_map names files inside it)")
            if full not in files.values() and not os.path.isfile(full):
                raise CheckpointError(index, tensor, f"the index puts it in {fname!r}, which does not exist")
            files[fname] = full
        return sorted(set(files.values())), {t: os.path.join(path, f) for t, f in weight_map.items()}
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise CheckpointError(path, None, "no *.safetensors files and no index")
    return files, None
