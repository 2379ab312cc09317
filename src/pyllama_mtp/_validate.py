"""Pre-validation of GGUF files before llama.cpp parses them.

llama.cpp treats a model file as trusted in places (a failed GGML_ASSERT aborts the
process). We read the file's structure with the ``gguf`` package first and reject
what is inconsistent with a clear :class:`~pyllama_mtp.ModelLoadError`.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ModelLoadError

_GGUF_MAGIC = b"GGUF"
_LLAMA_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS in src/llama-hparams.h


def check_gguf_file(path: str) -> dict:
    """Raise ModelLoadError if ``path`` is not a structurally sound GGUF file.

    Returns what the loader needs to know before llama.cpp runs: architecture, trunk
    block count and MTP block count.
    """
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r})")

    from gguf import GGUFReader  # heavy import; only when a model is loaded

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
        raise ModelLoadError(f"{path} is not a valid GGUF file: {exc}") from exc

    file_size = os.path.getsize(path)
    seen: set[str] = set()
    for tensor in reader.tensors:
        if tensor.name in seen:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} appears twice")
        seen.add(tensor.name)
        shape = [int(d) for d in tensor.shape]
        if any(d <= 0 for d in shape):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has shape {shape}")
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > file_size:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} ends at byte {end}, past the end of the file "
                f"({file_size} bytes): the file is truncated or corrupt")
        if int(np.prod(shape, dtype=np.float64)) != int(tensor.n_elements):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has inconsistent dimensions")

    def scalar(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    try:
        arch = scalar("general.architecture", "")
        n_blocks = int(scalar(f"{arch}.block_count", 0) or 0)
        n_nextn = int(scalar(f"{arch}.nextn_predict_layers", 0) or 0)
        _check_hparams(path, scalar, arch, n_blocks, n_nextn)
        _check_vocab(path, scalar)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a value of the wrong type is a bad file too
        raise ModelLoadError(f"{path}: unreadable metadata ({exc})") from exc
    return {"architecture": arch, "n_layer": n_blocks - n_nextn, "n_layer_nextn": n_nextn}


# Each check below stands for a GGML_ASSERT (a process abort) that the fuzz tests reached
# in the pinned llama.cpp with a damaged file.

def _check_hparams(path: str, scalar, arch: str, n_blocks: int, n_nextn: int) -> None:
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{path}: no general.architecture")
    if n_blocks <= 0 or not 0 <= n_nextn < n_blocks:
        raise ModelLoadError(f"{path}: {n_blocks} blocks with {n_nextn} MTP blocks is impossible")
    if n_blocks > _LLAMA_MAX_LAYERS:
        raise ModelLoadError(f"{path}: {n_blocks} blocks, more than llama.cpp's {_LLAMA_MAX_LAYERS}")
    n_rot = scalar(f"{arch}.rope.dimension_count")
    if n_rot is not None:
        n_embd = int(scalar(f"{arch}.embedding_length", 0) or 0)
        n_head = scalar(f"{arch}.attention.head_count", 0) or 0
        n_head = max(n_head) if isinstance(n_head, list) else int(n_head)
        head_dim = scalar(f"{arch}.attention.key_length") or (n_embd // n_head if n_head > 0 else 0)
        if not 0 < int(n_rot) <= int(head_dim):
            raise ModelLoadError(f"{path}: rope over {n_rot} dimensions of {head_dim}-dimensional heads")
        sections = scalar(f"{arch}.rope.dimension_sections")
        if sections is not None and (any(int(x) < 0 for x in sections) or sum(int(x) for x in sections) > int(n_rot)):
            raise ModelLoadError(f"{path}: rope sections {sections} exceed {n_rot} rotary dimensions")
    n_expert = int(scalar(f"{arch}.expert_count", 0) or 0)
    if n_expert:
        n_used = int(scalar(f"{arch}.expert_used_count", 0) or 0)
        if not 0 < n_used <= n_expert:
            raise ModelLoadError(f"{path}: {n_used} experts used of {n_expert}")


def _check_vocab(path: str, scalar) -> None:
    tokens = scalar("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if len(set(tokens)) != len(tokens):
        raise ModelLoadError(f"{path}: the vocabulary has duplicate tokens")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        values = scalar(key)
        if values is not None and len(values) != len(tokens):
            raise ModelLoadError(f"{path}: {key} has {len(values)} entries for {len(tokens)} tokens")
