"""Stream a DeepSeek-V4 checkpoint tensor by tensor under canonical names, dequantised.

    for t in iter_checkpoint(path, dtype=ml_dtypes.bfloat16):
        params[t.name] = jax.device_put(t.array)

The whole checkpoint is planned from the safetensors headers first (names, layout, quantisation
companions, scale shapes), so a bad checkpoint fails before any data is read; then each file is
walked front to back and only one tensor at a time is materialised on the host.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator

import numpy as np

from atom_jax.weights import names as nm
from atom_jax.weights import quant
from atom_jax.weights.errors import CheckpointError
from atom_jax.weights.safetensors_io import PACKED_FP4, SafetensorsFile, list_safetensors

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_FP8_DTYPES = {"F8_E4M3"}
_PACKED_FP4_DTYPES = {"I8", "U8", PACKED_FP4}
_SCALE_DTYPES = {"F32", "F16", "BF16", "F8_E8M0"}

PLAIN, INTEGER, FP8, FP4 = "plain", "integer", "fp8", "fp4"


@dataclasses.dataclass
class CheckpointTensor:
    name: str  # canonical name
    array: np.ndarray  # dequantised [out, in] torch layout; integer tables (tid2eid) as stored
    source: str  # file it came from
    source_name: str  # name in that file
    kind: str = PLAIN  # FP8 / FP4 when yielded packed (`iter_checkpoint(keep_packed=...)`)
    scale: np.ndarray | None = None  # packed only: the scales as stored

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """What `iter_checkpoint` will yield for one canonical name, known from headers alone."""

    name: str
    shape: tuple[int, ...]  # logical (dequantised) shape
    kind: str  # PLAIN / INTEGER / FP8 / FP4
    source: str
    source_name: str
    select: tuple | None = None  # index into the stored tensor (stacked experts)
    scale_source: str | None = None
    scale_name: str | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    layout: str  # names.LAYOUT_*
    tensors: tuple[PlannedTensor, ...]  # in reading order
    files: tuple[str, ...]


def _compile(ignore) -> list[re.Pattern]:
    if ignore is None:
        return []
    if isinstance(ignore, (str, re.Pattern)):
        ignore = [ignore]
    return [re.compile(p) for p in ignore]


def _ignored(patterns, *candidates) -> bool:
    return any(p.search(c) for p in patterns for c in candidates)


def _locate(path) -> tuple[list[str], dict[str, SafetensorsFile], dict[str, str]]:
    """(files, open headers, raw tensor name -> file)."""
    files, weight_map = list_safetensors(path)
    headers = {f: SafetensorsFile(f) for f in files}
    where: dict[str, str] = {}
    if weight_map is not None:  # the index is the authority on which file holds what
        for tensor, f in weight_map.items():
            if tensor not in headers[f]:
                raise CheckpointError(f, tensor, "listed in the index for this file but not present in it")
            where[tensor] = f
    else:
        for f in files:
            for tensor in headers[f].names():
                if tensor in where:
                    raise CheckpointError(f, tensor, f"also stored in {where[tensor]}")
                where[tensor] = f
    return files, headers, where


def _classify(headers, where, raw: str, companion: str | None) -> tuple[str, tuple[int, ...]]:
    """(kind, logical shape) of a non-companion tensor; checks scale presence and shape."""
    f = where[raw]
    info = headers[f].info(raw)
    dt = info.dtype
    if dt in _FP8_DTYPES:
        kind = FP8
    elif dt in _PACKED_FP4_DTYPES and (companion is not None or dt == PACKED_FP4 or raw.endswith(".weight")):
        kind = FP4  # int8 linear weights only exist as packed FP4 experts
    elif dt in _FLOAT_DTYPES:
        kind = PLAIN
    elif dt in {"F8_E5M2", "F8_E8M0"}:
        raise CheckpointError(f, raw, f"dtype {dt} is not a weight format this reader dequantises")
    else:
        kind = INTEGER
    if kind not in (FP8, FP4):
        if companion is not None:
            raise CheckpointError(f, raw, f"stored as {dt} but has a quantisation scale {companion!r}")
        return kind, info.shape
    stem = raw[: -len(".weight")] if raw.endswith(".weight") else raw
    if companion is None:
        raise CheckpointError(f, raw, f"quantised ({dt}) but its scale companion {stem + '.scale'!r} is missing")
    if len(info.shape) != 2:
        raise CheckpointError(f, raw, f"quantised weight must be 2-D, shape is {list(info.shape)}")
    sf = where[companion]
    sinfo = headers[sf].info(companion)
    if sinfo.dtype not in _SCALE_DTYPES:
        raise CheckpointError(sf, companion, f"scale of {raw!r} has unsupported dtype {sinfo.dtype}")
    out_f, in_f = info.shape
    if kind == FP4 and dt != PACKED_FP4:
        in_f *= 2  # two e2m1 codes per stored byte
    want = quant.fp8_scale_shape(out_f, in_f) if kind == FP8 else quant.fp4_scale_shape(out_f, in_f)
    if tuple(sinfo.shape) != want:
        fmt = "FP8 128x128-block" if kind == FP8 else "FP4 32-input"
        raise CheckpointError(sf, companion, f"{fmt} scale of {raw!r} ({dt} {list(info.shape)}) has shape "
                                             f"{list(sinfo.shape)}, expected {list(want)}")
    return kind, (out_f, in_f)


def plan_checkpoint(path: str | os.PathLike, ignore: Iterable[str] | str | None = None) -> CheckpointPlan:
    """Canonical names, shapes, sources and quantisation of every tensor, from headers only.

    `ignore`: regexes; a tensor whose source or canonical name matches one is skipped (with its
    scale), e.g. `ignore=[r"^mtp\\."]`. Raises CheckpointError for names that map nowhere,
    missing/misshaped scales, duplicates, bad dtypes and broken files."""
    patterns = _compile(ignore)
    files, headers, where = _locate(path)
    companion_of: dict[str, str] = {}
    for raw in where:
        cs = nm.companion_stem(raw)
        if cs is not None and cs[0] in where:
            if cs[0] in companion_of:
                raise CheckpointError(where[raw], raw, f"{cs[0]!r} has two scales: {companion_of[cs[0]]!r} and {raw!r}")
            companion_of[cs[0]] = raw
    companions = set(companion_of.values())
    order = {f: i for i, f in enumerate(files)}
    raws = sorted((r for r in where if r not in companions),
                  key=lambda r: (order[where[r]], headers[where[r]].info(r).begin))
    planned: list[PlannedTensor] = []
    seen: dict[str, PlannedTensor] = {}
    for raw in raws:
        f = where[raw]
        if _ignored(patterns, raw):
            continue
        mappings = nm.map_name(raw, headers[f].info(raw).shape)
        if mappings is None:
            raise CheckpointError(f, raw, "name maps to no DeepSeek-V4 tensor (pass ignore=[regex] to skip it)")
        mappings = [m for m in mappings if not _ignored(patterns, m.canonical)]
        if not mappings:
            continue
        companion = companion_of.get(raw)
        kind, shape = _classify(headers, where, raw, companion)
        if mappings[0].select is not None and kind not in (PLAIN, INTEGER):
            raise CheckpointError(f, raw, "quantised stacked experts are not supported")
        for m in mappings:
            p = PlannedTensor(m.canonical, m.shape if m.select is not None else shape, kind, f, raw, m.select,
                              None if companion is None else where[companion], companion)
            if m.canonical in seen:
                prev = seen[m.canonical]
                raise CheckpointError(f, raw, f"gives canonical {m.canonical!r}, already given by "
                                              f"{prev.source_name!r} in {prev.source}")
            seen[m.canonical] = p
            planned.append(p)
    for h in headers.values():
        h.close()
    return CheckpointPlan(nm.detect_layout(where), tuple(planned), tuple(files))


def checkpoint_names(path: str | os.PathLike, ignore=None) -> dict[str, tuple[tuple[int, ...], str]]:
    """{canonical name: (dequantised shape, source file)} without reading any tensor data."""
    return {p.name: (p.shape, p.source) for p in plan_checkpoint(path, ignore).tensors}


def checkpoint_layout(path: str | os.PathLike) -> str:
    """names.LAYOUT_OFFICIAL / LAYOUT_HF_SAVED / LAYOUT_HF_MODULES."""
    _, _, where = _locate(path)
    return nm.detect_layout(where)


def _materialise(p: PlannedTensor, headers: dict[str, SafetensorsFile], dtype) -> np.ndarray:
    stored = headers[p.source].get(p.source_name)
    if p.select is not None:
        stored = stored[p.select]
    if p.kind == INTEGER:
        return stored
    if p.kind == PLAIN:
        return stored if stored.dtype == dtype else stored.astype(dtype)
    scale = headers[p.scale_source].get(p.scale_name)
    try:
        if p.kind == FP8:
            return quant.dequantize_fp8(stored, scale, dtype)
        return quant.dequantize_fp4(stored, scale, dtype)
    except ValueError as e:
        raise CheckpointError(p.source, p.source_name, str(e)) from None


def iter_checkpoint(path: str | os.PathLike, dtype=np.float32, ignore=None,
                    keep_packed=None) -> Iterator[CheckpointTensor]:
    """Yield every tensor of the checkpoint under its canonical name, dequantised to `dtype`.

    Float tensors are cast to `dtype` (a read-only view of the file when already `dtype`);
    integer tables (`ffn.gate.tid2eid`) come as stored. Scale companions are consumed, except
    for the quantised tensors `keep_packed(canonical name, kind)` accepts: those come as
    stored, uint8 codes (FP8 [out, in], FP4 [out, in/2]) with `kind` and `scale` set."""
    dtype = np.dtype(dtype)
    plan = plan_checkpoint(path, ignore)
    headers: dict[str, SafetensorsFile] = {}
    current = None
    for p in plan.tensors:
        if p.source != current:  # finished a file: drop every mapping we hold
            for h in headers.values():
                h.close()
            current = p.source
        for f in (p.source, p.scale_source):
            if f is not None and f not in headers:
                headers[f] = SafetensorsFile(f)
        if keep_packed is not None and p.kind in (FP8, FP4) and p.select is None and keep_packed(p.name, p.kind):
            codes = headers[p.source].get(p.source_name).view(np.uint8)
            scale = headers[p.scale_source].get(p.scale_name)
            yield CheckpointTensor(p.name, codes, p.source, p.source_name, p.kind, scale)
            continue
        yield CheckpointTensor(p.name, _materialise(p, headers, dtype), p.source, p.source_name)
    for h in headers.values():
        h.close()
