"""Structured mutations of a GGUF model file, for the damaged-model reliability tests.

Unlike the random byte flips in ``test_reliability.damaged_variants`` these produce files that
parse (mostly) but lie in one meaningful place: a hyperparameter, a tensor's shape, type, data
or offset, the token lists, or a special token id. Each :class:`Mutation` is lazy: ``write()``
rebuilds the file from the parsed source on demand, so thousands never sit on disk at once.

GGUF bytes are written here rather than with ``gguf.GGUFWriter`` because the writer refuses
exactly what these files need (duplicate tensor names, a declared type that disagrees with the
data size, hand-picked offsets). Unchanged key/values are copied byte for byte from the source.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

KINDS = ("hparam", "tensor", "vocab", "special")

_INT_TYPES = {  # value type -> (bits, signed)
    VT.UINT8: (8, False), VT.INT8: (8, True), VT.UINT16: (16, False), VT.INT16: (16, True),
    VT.UINT32: (32, False), VT.INT32: (32, True), VT.UINT64: (64, False), VT.INT64: (64, True),
}
_NP_TYPES = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
    VT.INT32: "<i4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT32: "<f4", VT.FLOAT64: "<f8",
    VT.BOOL: "<u1",
}
_TOKENS, _SCORES, _TYPES, _MERGES = ("tokenizer.ggml." + k for k in ("tokens", "scores", "token_type", "merges"))
_SPECIAL = re.compile(r"^tokenizer\.ggml\.\w+_token_id$")
# Every special-id key gguf knows; absent ones are added pointing one past the vocabulary.
_KNOWN_SPECIAL = sorted({v for k, v in vars(gguf.Keys.Tokenizer).items()
                         if k.endswith("_ID") and isinstance(v, str) and _SPECIAL.match(v)})
_ALIGN_KEY = "general.alignment"
_DEFAULT_ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT
_DEQUANTIZABLE = {QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                  QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}


# -- the parsed file -----------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: bytes
    dims: tuple[int, ...]       # GGUF order: ne0 (the row length) first
    ttype: int                  # declared ggml type id (may be invalid on purpose)
    data: Any                   # 1-D uint8 array or bytes, written as is
    offset_mode: str = ""       # "" (honest), "+1" (misaligned) or "end" (past the data)


@dataclass(frozen=True)
class _Gguf:
    kvs: tuple[tuple[str, bytes], ...]      # (key, full encoded key/value) in file order
    values: dict[str, tuple[int, int | None, Any]]  # key -> (type, array sub type, value)
    tensors: tuple[_Tensor, ...]


def _str_bytes(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _encode_kv(key: str, vtype: int, value: Any, sub: int | None = None) -> bytes:
    """One key/value record; integer values must already fit the type (see :func:`_fit`)."""
    out = _str_bytes(key.encode()) + struct.pack("<I", vtype)
    if vtype == VT.STRING:
        return out + _str_bytes(value)
    if vtype != VT.ARRAY:
        return out + np.array([value], dtype=_NP_TYPES[VT(vtype)]).tobytes()
    out += struct.pack("<IQ", sub, len(value))
    if sub == VT.STRING:
        return out + b"".join(_str_bytes(v) for v in value)
    return out + np.array(list(value), dtype=_NP_TYPES[VT(sub)]).tobytes()


def _decode(f: gguf.ReaderField) -> tuple[int, int | None, Any]:
    main = int(f.types[0])
    if main == VT.ARRAY:
        sub = int(f.types[-1])
        if len(f.types) != 2:       # nested arrays are only ever copied verbatim
            return main, sub, None
        if sub == VT.STRING:
            return main, sub, [bytes(f.parts[i]) for i in f.data]
        return main, sub, [f.parts[i][0].item() for i in f.data]
    if main == VT.STRING:
        return main, None, bytes(f.parts[f.data[0]])
    return main, None, f.parts[f.data[0]][0].item()


@functools.lru_cache(maxsize=4)
def _parse(path: str, _mtime_ns: int, _size: int) -> _Gguf:
    reader = gguf.GGUFReader(path)
    if reader.byte_order != "I":
        raise NotImplementedError(f"{path}: only little-endian GGUF files are supported")
    kvs, values = [], {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # header pseudo-fields
            continue
        kvs.append((key, b"".join(part.tobytes() for part in f.parts)))
        values[key] = _decode(f)
    tensors = tuple(
        _Tensor(t.name.encode(), tuple(int(d) for d in t.shape), int(t.tensor_type),
                reader.data[t.data_offset:t.data_offset + int(t.n_bytes)])
        for t in reader.tensors)
    return _Gguf(tuple(kvs), values, tensors)


def _load(path: pathlib.Path) -> _Gguf:
    # keyed by mtime and size too, so a regenerated fixture is parsed again
    st = os.stat(path)
    return _parse(str(path), st.st_mtime_ns, st.st_size)


def _layout_alignment(g: _Gguf) -> int:
    """The declared alignment where a reader could honour it, else the default (the file then
    lies about its alignment, which is the point of that mutation)."""
    raw = dict(g.kvs).get(_ALIGN_KEY)
    if raw is None:
        return _DEFAULT_ALIGN
    at = 8 + len(_ALIGN_KEY.encode())
    if len(raw) != at + 8 or struct.unpack_from("<I", raw, at)[0] != VT.UINT32:
        return _DEFAULT_ALIGN
    value = struct.unpack_from("<I", raw, at + 4)[0]
    return value if 0 < value <= 1 << 20 and value & (value - 1) == 0 else _DEFAULT_ALIGN


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


def _write_gguf(destination: pathlib.Path, g: _Gguf) -> None:
    align = _layout_alignment(g)
    offsets, at = [], 0
    for t in g.tensors:
        offsets.append(at)
        at += len(t.data)
        at += _pad(at, align)
    infos = []
    for t, off in zip(g.tensors, offsets):
        off = {"": off, "+1": off + 1, "end": at + align}[t.offset_mode]
        infos.append(_str_bytes(t.name) + struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, t.ttype, off))
    head = b"".join([b"GGUF", struct.pack("<IQQ", 3, len(g.tensors), len(g.kvs))]
                    + [raw for _, raw in g.kvs] + infos)
    with open(destination, "wb") as out:
        out.write(head + b"\0" * _pad(len(head), align))
        for t in g.tensors:
            out.write(memoryview(t.data))
            out.write(b"\0" * _pad(len(t.data), align))


# -- edits: module-level functions so a Mutation pickles (e.g. to a worker process) --------


def _put_kv(g: _Gguf, key: str, raw: bytes | None) -> _Gguf:
    """Replace (or append, or with ``raw=None`` remove) one key/value."""
    kvs = [(k, r) for k, r in g.kvs if k != key or raw is not None]
    if raw is not None:
        if key in dict(g.kvs):
            kvs = [(k, raw if k == key else r) for k, r in kvs]
        else:
            kvs.append((key, raw))
    return replace(g, kvs=tuple(kvs))


def _unique_token(tokens: Sequence[bytes]) -> bytes:
    taken, i = set(tokens), 0
    while f"<|pmtp_extra_{i}|>".encode() in taken:
        i += 1
    return f"<|pmtp_extra_{i}|>".encode()


def _vocab_edit(g: _Gguf, key: str, how: str) -> _Gguf:
    """Token list edits, computed from the decoded source at write time."""
    n = len(g.values[_TOKENS][2]) if _TOKENS in g.values else 0
    _, sub, old = g.values.get(key, (VT.ARRAY, VT.FLOAT32 if key == _SCORES else VT.INT32, None))
    if old is None:  # an absent array gets a filler of the right length first
        old = [0.0] * n if key == _SCORES else [int(gguf.TokenType.NORMAL)] * n
    new: Any = list(old)
    if how == "len-1":
        new = new[:-1]
    elif how == "len+1":
        new.append(_unique_token(new) if sub == VT.STRING else new[-1] if new else 0)
    elif how == "empty":
        new = []
    elif how == "duplicate":
        new[1] = new[0]
    elif how.startswith("[0]="):
        new[0] = {"''": b"", "invalid-utf8": b"\xff\xfe\x80", "nan": math.nan}.get(how[4:], None)
        if new[0] is None:
            new[0] = _fit(int(how[4:]), sub)
    elif how.startswith("[*]="):
        new = [_fit(int(how[4:]), sub)] * len(new)
    elif how == "malformed":        # the pair's separating space removed
        new[0] = new[0].replace(b" ", b"")
    elif how == "unknown-tokens":
        new.append(b"pmtp_unknown_a pmtp_unknown_b")
    elif how.startswith("="):       # a string key/value (tokenizer.ggml.model / pre)
        return _put_kv(g, key, _encode_kv(key, VT.STRING, b"" if how == "=''" else how[1:].encode()))
    else:  # pragma: no cover - internal table
        raise AssertionError(how)
    return _put_kv(g, key, _encode_kv(key, VT.ARRAY, new, sub))


def _nbytes(dims: Sequence[int], ttype: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[QT(ttype)]
    return math.prod(dims[1:]) * (dims[0] // block) * size if dims else 0


def _rows(t: _Tensor) -> np.ndarray:
    """The data as uint8 rows of ``dims[0]`` elements each."""
    data = np.frombuffer(t.data, dtype=np.uint8)
    n_rows = math.prod(t.dims[1:])
    return data.reshape(n_rows, -1) if n_rows else data.reshape(0, 0)


def _resized(t: _Tensor, dims: tuple[int, ...]) -> _Tensor:
    """New dims, each row zero-padded or cut to the new row size, then rows padded or cut."""
    rows = _rows(t)
    row_bytes = _nbytes((dims[0],), t.ttype)
    n_rows = math.prod(dims[1:])
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    keep_r, keep_c = min(n_rows, rows.shape[0]), min(row_bytes, rows.shape[1] if rows.size else 0)
    out[:keep_r, :keep_c] = rows[:keep_r, :keep_c]
    return replace(t, dims=dims, data=out.reshape(-1))


def _floats(t: _Tensor) -> np.ndarray:
    rows = _rows(t)
    if t.ttype == QT.F32:
        return rows.view("<f4")
    return gguf.quants.dequantize(rows, QT(t.ttype)).astype(np.float32).reshape(len(rows), -1)


def _retyped(t: _Tensor, target: QT) -> _Tensor:
    values = _floats(t)
    if target == QT.F32:
        data = values.astype("<f4")
    elif target == QT.F16:
        data = values.astype("<f2")
    else:
        data = gguf.quants.quantize(values, target)
    return replace(t, ttype=int(target), data=np.ascontiguousarray(data).view(np.uint8).reshape(-1))


def _tensor_change(t: _Tensor, how: str) -> _Tensor:
    d = t.dims
    if how == "rename":
        return replace(t, name=b"pmtp_unknown." + t.name)
    if how == "name-too-long":  # ggml's GGML_MAX_NAME is 64 bytes with the terminator
        return replace(t, name=t.name + b"_" * max(1, 64 - len(t.name)))
    if how == "transpose":
        return replace(t, dims=(d[1], d[0]) + d[2:])
    if how.startswith("dim0"):
        return _resized(t, ({"dim0+1": d[0] + 1, "dim0-1": d[0] - 1, "dim0=0": 0}[how],) + d[1:])
    if how == "last//2":
        return _resized(t, d[:-1] + (d[-1] // 2,))
    if how == "flatten":
        return replace(t, dims=(math.prod(d),))
    if how == "extra-dim=1":
        return replace(t, dims=d + (1,))
    if how == "extra-dim=2":
        data = np.frombuffer(t.data, dtype=np.uint8)
        return replace(t, dims=d + (2,), data=np.concatenate([data, data]))
    if how.startswith("retype:"):
        return _retyped(t, QT[how[7:]])
    if how.startswith("wrongtype:"):  # declared type changes, the bytes do not
        name = how[10:]
        return replace(t, ttype=int(QT[name]) if name in QT.__members__ else int(name))
    if how == "fill:nan":  # all-ones bytes: NaN in f32/f16/bf16, NaN scales in quantized blocks
        return replace(t, data=np.full(len(t.data), 0xFF, dtype=np.uint8))
    if how == "fill:inf":
        dtype = "<f4" if t.ttype == QT.F32 else "<f2"
        return replace(t, data=np.full(len(t.data) // np.dtype(dtype).itemsize, np.inf, dtype=dtype).view(np.uint8))
    if how in ("offset+1", "offset=end"):
        return replace(t, offset_mode={"offset+1": "+1", "offset=end": "end"}[how])
    raise AssertionError(how)  # pragma: no cover - internal table


def _tensor_edit(g: _Gguf, index: int, how: str) -> _Gguf:
    tensors = list(g.tensors)
    if how == "drop":
        del tensors[index]
    elif how == "duplicate":
        tensors.insert(index + 1, tensors[index])
    else:
        tensors[index] = _tensor_change(tensors[index], how)
    return replace(g, tensors=tuple(tensors))


# -- the public API ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One damaged variant of ``source``; ``write()`` produces it on demand."""

    name: str
    kind: str
    source: pathlib.Path = field(repr=False)
    edit: Callable[[_Gguf], _Gguf] = field(repr=False, compare=False)

    def write(self, destination: str | os.PathLike) -> None:
        _write_gguf(pathlib.Path(destination), self.edit(_load(self.source)))


def _fit(value: int, vtype: int) -> int:
    """``value`` as the given integer type stores it (two's complement wrap), so -1 becomes the
    all-ones pattern of an unsigned type and max + 1 wraps to 0."""
    bits, signed = _INT_TYPES[VT(vtype)]
    value &= (1 << bits) - 1
    return value - (1 << bits) if signed and value >> (bits - 1) else value


def _int_values(value: int, vtype: int) -> list[tuple[str, int]]:
    """(label, new value) for one integer: the constants first, then the relative ones."""
    bits, _ = _INT_TYPES[VT(vtype)]
    huge = 2**62 if bits == 64 else 2 ** (bits - 1) - 1
    consts = [0, 1, -1, huge, 2 ** (bits - 1)]  # the last is the sign bit alone: INT_MIN
    out = [(str(_fit(c, vtype)), _fit(c, vtype)) for c in consts]
    rel = [("value+1", value + 1), ("value-1", value - 1), ("value*2", value * 2), ("value//2", value // 2)]
    return out + [(label, _fit(v, vtype)) for label, v in rel]


def _hparam_mutations(g: _Gguf, add: Callable[..., None]) -> None:
    for key, (vtype, sub, value) in g.values.items():
        if _SPECIAL.match(key) or (key.startswith("tokenizer.ggml.") and vtype == VT.ARRAY):
            continue  # the token lists and special ids have their own kinds
        if vtype in _INT_TYPES:
            seen = {value}
            for _, new in _int_values(value, vtype):
                if new not in seen:
                    seen.add(new)
                    add("hparam", f"kv:{key}={new}", _put_kv, key, _encode_kv(key, vtype, new))
        elif vtype == VT.ARRAY and sub in _INT_TYPES and value:
            table = [_int_values(v, sub) for v in value]  # labels are the same for every v
            variants = [(f"[*]={label}", [row[j][1] for row in table])  # every element at once
                        for j, (label, _) in enumerate(table[0])]
            variants += [(f"[0]={new0}", [new0] + value[1:]) for _, new0 in table[0]]  # the first only
            variants += [(f":len={len(value) - 1}", value[:-1]),  # per-layer arrays must match n_layer
                         (f":len={len(value) + 1}", value + value[-1:])]
            seen_arrays = {tuple(value)}
            for label, new in variants:
                if tuple(new) not in seen_arrays:
                    seen_arrays.add(tuple(new))
                    add("hparam", f"kv:{key}{label}", _put_kv, key, _encode_kv(key, vtype, new, sub))
    if _ALIGN_KEY not in g.values:  # the fixtures rely on the default; declare odd ones
        for new in (0, 1, 3, 16, 64, 2**31 - 1, 2**32 - 1):
            add("hparam", f"kv:{_ALIGN_KEY}={new}", _put_kv, _ALIGN_KEY, _encode_kv(_ALIGN_KEY, VT.UINT32, new))


def _tensor_hows(index: int, t: _Tensor) -> list[str]:
    d, nd = t.dims, len(t.dims)
    hows = ["drop", "duplicate", "rename"] + (["name-too-long"] if index == 0 else [])
    if nd >= 2 and d[0] != d[1]:
        hows.append("transpose")
    hows += ["dim0+1"] + (["dim0-1"] if d[0] > 1 else []) + ["dim0=0"]
    if nd >= 2 and d[-1] >= 2:
        hows.append("last//2")
    hows += (["flatten"] if nd >= 2 else []) + ["extra-dim=1", "extra-dim=2"]
    if t.ttype == QT.F32:
        hows += ["retype:F16", "retype:BF16"]
        hows += ["retype:Q8_0", "retype:Q4_0"] if d[0] % 32 == 0 else []
    elif t.ttype in _DEQUANTIZABLE:
        hows.append("retype:F32")
    wrong = [q.name for q in (QT.F16, QT.F32, QT.Q8_0) if q != t.ttype][:2]
    hows += [f"wrongtype:{w}" for w in wrong] + ["wrongtype:4", "wrongtype:99"]  # 4: a removed type
    hows += ["fill:nan"] + (["fill:inf"] if t.ttype in (QT.F32, QT.F16) else [])
    return hows + ["offset+1", "offset=end"]


def _vocab_hows(g: _Gguf) -> list[tuple[str, str]]:
    if _TOKENS not in g.values:
        return []
    hows = [(_TOKENS, h) for h in ("len-1", "len+1", "empty", "duplicate", "[0]=''", "[0]=invalid-utf8")]
    hows += [(_SCORES, h) for h in ("len-1", "len+1")]
    hows += [(_SCORES, "[0]=nan")] if _SCORES in g.values else []
    hows += [(_TYPES, h) for h in ("len-1", "len+1", "[0]=99", "[0]=-1", "[0]=0", "[*]=99")]
    if g.values.get(_MERGES, (0, 0, None))[2]:
        hows += [(_MERGES, h) for h in ("malformed", "unknown-tokens", "empty")]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        if key in g.values:
            hows += [(key, "=pmtp-unknown"), (key, "=''")]
    return hows


def _special_mutations(g: _Gguf, add: Callable[..., None]) -> None:
    n_vocab = len(g.values[_TOKENS][2]) if _TOKENS in g.values else 0
    for key, (vtype, _, value) in g.values.items():
        if _SPECIAL.match(key) and vtype in _INT_TYPES:
            seen = {value}
            for new in (n_vocab, n_vocab + 1000, 2**31 - 1, -1):
                new = _fit(new, vtype)
                if new not in seen:
                    seen.add(new)
                    add("special", f"special:{key}={new}", _put_kv, key, _encode_kv(key, vtype, new))
    for key in _KNOWN_SPECIAL:  # absent ids (bos and eos above all) added out of range
        if key not in g.values:
            add("special", f"special:+{key}={n_vocab}", _put_kv, key, _encode_kv(key, VT.UINT32, n_vocab))


def structured_mutations(source: str | os.PathLike) -> list[Mutation]:
    """Every structured mutation of ``source``, in a fixed order (kinds, then file order)."""
    path = pathlib.Path(source).resolve()
    g = _load(path)
    found: list[Mutation] = []
    names = set()

    def add(kind: str, name: str, fn: Callable[..., _Gguf], *args: Any) -> None:
        if name in names:  # pragma: no cover - would be a bug in the tables above
            raise AssertionError(f"duplicate mutation name {name}")
        names.add(name)
        found.append(Mutation(name, kind, path, functools.partial(_call_with_g_first, fn, args)))

    _hparam_mutations(g, add)
    for i, t in enumerate(g.tensors):
        for how in _tensor_hows(i, t):
            add("tensor", f"tensor:{t.name.decode(errors='replace')}:{how}", _tensor_edit, i, how)
    for key, how in _vocab_hows(g):
        add("vocab", f"vocab:{key}{'' if how.startswith('=') else ':'}{how}", _vocab_edit, key, how)
    _special_mutations(g, add)
    return found


def _call_with_g_first(fn: Callable[..., _Gguf], args: tuple[Any, ...], g: _Gguf) -> _Gguf:
    # partial() binds leading arguments, but every edit takes the parsed file first
    return fn(g, *args)


def spread(mutations: Sequence[Mutation], n: int) -> list[Mutation]:
    """A deterministic, evenly spaced subset of ``n`` that has every kind present (when ``n`` is
    at least the number of kinds), in the original order. Each kind gets a share proportional
    to its size (at least one); within a kind the picks are evenly spaced."""
    if n >= len(mutations):
        return list(mutations)
    if n <= 0:
        return []
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(mutations):
        groups.setdefault(m.kind, []).append(i)
    kinds = sorted(groups, key=lambda k: (-len(groups[k]), k))[:n]
    quota = {k: 1 for k in kinds}
    for _ in range(n - len(kinds)):  # next pick to the kind least covered per member
        k = max((k for k in kinds if quota[k] < len(groups[k])),
                key=lambda k: (len(groups[k]) / quota[k], -kinds.index(k)))
        quota[k] += 1
    chosen = []
    for k in kinds:
        members, q = groups[k], quota[k]
        chosen += [members[(j * len(members)) // q] for j in range(q)]
    return [mutations[i] for i in sorted(chosen)]
