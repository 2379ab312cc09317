"""Tools for the MTP (NextN) layers inside GGUF files: inspect, strip, extract, graft.

llama.cpp stores a model's MTP heads as the last ``nextn_predict_layers`` blocks
(``blk.{n_trunk}..``) and counts them in ``block_count``. These tools rewrite that
layout with the ``gguf`` package: tensors are copied byte for byte (any quantization),
metadata is copied with the two counts fixed. They read and write files only; nothing
here loads a model.
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import gguf

from .errors import InvalidArgumentError, ModelLoadError

PathLike = Union[str, "os.PathLike[str]"]
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class GGUFSummary:
    """What ``inspect`` reports about one GGUF file."""

    path: str
    architecture: str
    n_layer: int  #: trunk blocks (block_count minus the MTP blocks)
    n_mtp_layers: int  #: nextn_predict_layers
    n_embd: int
    n_vocab: int
    n_tensors: int
    file_bytes: int
    tensor_bytes: int
    mtp_tensor_bytes: int
    types: dict[str, int] = field(default_factory=dict)  #: tensor count per quantization type
    mtp_kv_bytes_per_token: int = 0  #: f16 K+V of the MTP layers, per context position

    def mtp_memory(self, n_ctx: int) -> int:
        """Bytes MTP adds at ``n_ctx``: its weights plus its own KV cache (f16)."""
        return self.mtp_tensor_bytes + n_ctx * self.mtp_kv_bytes_per_token

    def __str__(self) -> str:
        mib = 1 << 20
        types = ", ".join(f"{name} x{count}" for name, count in sorted(self.types.items()))
        lines = [
            f"{os.path.basename(self.path)}: {self.architecture}, {self.n_layer} layers, "
            f"n_embd {self.n_embd}, vocabulary {self.n_vocab}",
            f"  {self.n_tensors} tensors, {self.tensor_bytes / mib:.1f} MiB ({types})",
        ]
        if self.n_mtp_layers:
            lines.append(f"  MTP: {self.n_mtp_layers} layer(s), {self.mtp_tensor_bytes / mib:.1f} MiB of tensors; "
                         f"at n_ctx 4096 MTP costs about {self.mtp_memory(4096) / mib:.1f} MiB")
        else:
            lines.append("  MTP: none (no nextn_predict_layers)")
        return "\n".join(lines)


class _Model:
    """A parsed GGUF file and the numbers these tools need from it."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (OSError, ValueError, IndexError, KeyError) as exc:  # the reader's failure modes
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.arch = self.scalar("general.architecture", None)
        if not isinstance(self.arch, str):
            raise ModelLoadError(f"{self.path}: general.architecture is missing")
        self.n_blocks = int(self.scalar(f"{self.arch}.block_count", 0))
        self.n_mtp = int(self.scalar(f"{self.arch}.nextn_predict_layers", 0))
        self.n_trunk = self.n_blocks - self.n_mtp
        self.n_embd = int(self.scalar(f"{self.arch}.embedding_length", 0))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        self.n_vocab = len(tokens.data) if tokens is not None else 0
        if self.n_blocks <= 0 or not 0 <= self.n_mtp < self.n_blocks:
            raise ModelLoadError(f"{self.path}: block_count {self.n_blocks} and nextn_predict_layers "
                                 f"{self.n_mtp} do not describe a model")

    def scalar(self, key: str, default: object) -> object:
        found = self.reader.fields.get(key)
        try:
            return found.contents() if found is not None else default
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{self.path}: {key} is not UTF-8 text ({exc})") from exc

    def block_of(self, name: str) -> Optional[int]:
        match = _BLOCK.match(name)
        return int(match.group(1)) if match else None

    def is_mtp(self, name: str) -> bool:
        block = self.block_of(name)
        return block is not None and block >= self.n_trunk

    def tokens_digest(self) -> int:
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        # The raw bytes: a token need not be valid UTF-8 to be compared.
        return hash(tuple(bytes(tokens.parts[i]) for i in tokens.data)) if tokens is not None else 0


def inspect(path: PathLike) -> GGUFSummary:
    """Architecture, sizes, quantization types and MTP layers of a GGUF file."""
    model = _Model(path)
    types: collections.Counter[str] = collections.Counter()
    total = mtp = 0
    for tensor in model.reader.tensors:
        types[tensor.tensor_type.name] += 1
        total += int(tensor.n_bytes)
        if model.is_mtp(tensor.name):
            mtp += int(tensor.n_bytes)
    arch = model.arch
    n_head = int(model.scalar(f"{arch}.attention.head_count", 0) or 0)
    n_head_kv = int(model.scalar(f"{arch}.attention.head_count_kv", n_head) or n_head)
    head_dim = n_head and model.n_embd // n_head
    key_length = int(model.scalar(f"{arch}.attention.key_length", head_dim) or head_dim)
    value_length = int(model.scalar(f"{arch}.attention.value_length", head_dim) or head_dim)
    kv_per_token = model.n_mtp * n_head_kv * (key_length + value_length) * 2  # f16 K and V
    return GGUFSummary(
        path=model.path, architecture=arch, n_layer=model.n_trunk, n_mtp_layers=model.n_mtp,
        n_embd=model.n_embd, n_vocab=model.n_vocab, n_tensors=len(model.reader.tensors),
        file_bytes=os.path.getsize(model.path), tensor_bytes=total, mtp_tensor_bytes=mtp,
        types=dict(types), mtp_kv_bytes_per_token=kv_per_token)


def _write(out: PathLike, source: _Model, n_blocks: int, n_mtp: int,
           tensors: list[tuple[str, gguf.ReaderTensor]]) -> None:
    """Write ``source``'s metadata (counts replaced) and ``tensors`` as (name, tensor)."""
    out = os.fspath(out)
    if os.path.abspath(out) == os.path.abspath(source.path):
        raise InvalidArgumentError("the output must not overwrite the input")
    arch = source.arch
    counts = {f"{arch}.block_count": n_blocks, f"{arch}.nextn_predict_layers": n_mtp}
    writer = gguf.GGUFWriter(out, arch)
    try:
        for item in source.reader.fields.values():
            if item.name.startswith("GGUF.") or item.name == "general.architecture":
                continue  # written by GGUFWriter itself
            if item.name in counts:
                continue
            kind = item.types[0]
            sub_type = item.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(item.name, item.contents(), kind, sub_type=sub_type)
        for key, value in counts.items():
            if value or key in source.reader.fields:
                writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
        for name, tensor in tensors:
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in tensors:
            writer.write_tensor_data(tensor.data)
    finally:
        writer.close()


def strip(path: PathLike, out: PathLike) -> GGUFSummary:
    """Write ``path`` without its MTP layers (for users short of memory)."""
    model = _Model(path)
    if model.n_mtp == 0:
        raise InvalidArgumentError(f"{model.path} has no MTP layers to strip")
    kept = [(t.name, t) for t in model.reader.tensors if not model.is_mtp(t.name)]
    _write(out, model, model.n_trunk, 0, kept)
    return inspect(out)


def extract_mtp(path: PathLike, out: PathLike) -> GGUFSummary:
    """Write only the MTP layers of ``path`` (with its metadata) to ``out``.

    The result is a donor for :func:`graft`: it puts these layers back into a trunk-only
    file of the same model. llama.cpp itself cannot load it on its own.
    """
    model = _Model(path)
    if model.n_mtp == 0:
        raise InvalidArgumentError(f"{model.path} has no MTP layers to extract")
    mtp = [(t.name, t) for t in model.reader.tensors if model.is_mtp(t.name)]
    _write(out, model, model.n_blocks, model.n_mtp, mtp)
    return inspect(out)


def graft(donor: PathLike, target: PathLike, out: PathLike) -> GGUFSummary:
    """Copy the MTP layers of ``donor`` into ``target`` (the same model without them).

    The donor may be a full model with MTP or an :func:`extract_mtp` file. Refuses when
    the two are not the same model: architecture, n_embd, vocabulary, trunk depth.
    """
    source, base = _Model(donor), _Model(target)
    if source.n_mtp == 0:
        raise InvalidArgumentError(f"{source.path} has no MTP layers to graft")
    if base.n_mtp != 0:
        raise InvalidArgumentError(f"{base.path} already has {base.n_mtp} MTP layer(s): strip it first")
    mismatches = [f"{what}: {a!r} vs {b!r}" for what, a, b in (
        ("architecture", source.arch, base.arch),
        ("n_embd", source.n_embd, base.n_embd),
        ("vocabulary size", source.n_vocab, base.n_vocab),
        ("trunk layers", source.n_trunk, base.n_trunk),
    ) if a != b]
    if not mismatches and source.tokens_digest() != base.tokens_digest():
        mismatches.append("vocabulary tokens differ")
    if mismatches:
        raise InvalidArgumentError(f"{source.path} and {base.path} are not the same model ("
                                   + "; ".join(mismatches) + ")")
    tensors = [(t.name, t) for t in base.reader.tensors]
    tensors += [(t.name, t) for t in source.reader.tensors if source.is_mtp(t.name)]
    _write(out, base, base.n_trunk + source.n_mtp, source.n_mtp, tensors)
    return inspect(out)

