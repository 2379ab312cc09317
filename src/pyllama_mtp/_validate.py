"""The GGUF container checked before llama.cpp opens it.

The file's structure (magic, tensor table, data inside the file) is read with the
``gguf`` package and a broken one is a clear :class:`~pyllama_mtp.ModelLoadError`. What
the values mean is left to llama.cpp itself, run first in a child process
(``_preflight.py``), so that no list of known bad values has to keep up with it.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ModelLoadError

_GGUF_MAGIC = b"GGUF"


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

    # What the loader needs before llama.cpp runs. Whether the values are consistent is
    # llama.cpp's to say, in the pre-flight's child process (_preflight.py), not a list here.
    try:
        arch = scalar("general.architecture", "")
        n_blocks = int(scalar(f"{arch}.block_count", 0) or 0)
        n_nextn = int(scalar(f"{arch}.nextn_predict_layers", 0) or 0)
    except Exception as exc:  # noqa: BLE001 - a value of the wrong type is a bad file too
        raise ModelLoadError(f"{path}: unreadable metadata ({exc})") from exc
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{path}: no general.architecture")
    return {"architecture": arch, "n_layer": n_blocks - n_nextn, "n_layer_nextn": n_nextn}
