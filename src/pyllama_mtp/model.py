"""``Model``: a loaded GGUF, its vocabulary and hyper-parameters."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _lowlevel, _preflight
from ._args import int_arg
from ._resource import Resource
from ._validate import check_gguf_file
from .chat_template import ChatTemplate
from .context import Context
from .errors import InvalidArgumentError, ModelLoadError, NoMTPError

ProgressCallback = Callable[[float], Optional[bool]]
PathLike = Union[str, "os.PathLike[str]"]


# MTP graphs of the pinned llama.cpp that assert a single MTP block (GGML_ASSERT, which
# kills the process): a file of these with several blocks is refused before that.
# step35, mimo2, hy_v3 and glm5-next run chained heads, one per draft position.
SINGLE_MTP_BLOCK_ARCHES = frozenset({
    "qwen35", "qwen35moe", "qwen3next", "deepseek2", "deepseek32", "deepseek4", "glm4moe",
    "glm-dsa", "nemotron_h_moe", "bailingmoe3", "cohere2moe",
})


class Model(Resource):
    """A model loaded by llama.cpp. Create it with :meth:`Model.load`.

    Contexts keep their model alive. Closing a model while contexts are open is
    deferred: the weights are freed when the last of its contexts closes, and the
    model refuses new contexts from then on.
    """

    def __init__(self, native: _lowlevel.NativeModel, path: str, load_mtp: bool,
                 preflight: Optional[_preflight.Preflight] = None) -> None:
        self._native = native
        self._path = path
        self._preflight = preflight
        hp = native.hparams()
        self._hparams = hp
        self._metadata = native.metadata()
        self._mtp_loaded = load_mtp and hp["n_layer_nextn"] > 0
        self._mtp_bytes: Optional[int] = None
        self._chat_template: Optional[ChatTemplate] = None
        self._mark_open()

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        n_gpu_layers: int = -1,
        load_mtp: bool = True,
        use_mmap: bool = True,
        progress: Optional[ProgressCallback] = None,
        devices: Optional[Sequence[str]] = None,
        mtp_device: Optional[str] = None,
        preflight: Optional[bool] = None,
        repack: Optional[bool] = None,
    ) -> "Model":
        """Load a GGUF file.

        Args:
            path: the GGUF file.
            n_gpu_layers: layers to offload to a GPU backend (-1: all; ignored on CPU-only builds).
            load_mtp: load the MTP (nextn) layers when the file has them. ``False`` saves
                their memory; the model then decodes normally but cannot draft.
            use_mmap: map the file instead of reading it into memory.
            progress: called with a fraction in [0, 1] while loading; returning ``False``
                cancels the load (:class:`~pyllama_mtp.LoadCancelledError`).
            devices: device names (see :func:`pyllama_mtp.devices`) to offload to, in
                order; default: every device llama.cpp finds.
            mtp_device: put the MTP layers (and so the draft computation) on this device
                instead, e.g. a second, smaller GPU, or ``"CPU"``.
            preflight: first run llama.cpp's loader, a context's set-up (dry) and one
                computation on the CPU in a child process, so that a file that would abort
                llama.cpp raises ModelLoadError instead of ending this process; contexts of
                a new shape are checked the same way (dry). Default: on, unless the environment sets
                ``PYLLAMA_MTP_PREFLIGHT=0``. ``False`` saves its cost (see the README's
                reliability section) for files known to be sound.
            repack: let llama.cpp repack weights into the CPU's extra buffer types
                (AMX, interleaved layouts) for faster kernels. None: the environment's
                ``PYLLAMA_MTP_REPACK`` (0 or 1) if set, else yes, unless the pre-flight's
                computation dies in those kernels on this machine, then no (with a warning
                in the log). The command line's ``--no-repack`` sets it to 0.

        Raises:
            ModelLoadError: the file is missing, unreadable, corrupt or unsupported, or
                llama.cpp would crash on it.
        """
        path_str = os.fspath(path)
        if not os.path.isfile(path_str):
            raise ModelLoadError(f"no such model file: {path_str}")
        n_gpu_layers = int_arg("n_gpu_layers", n_gpu_layers, -1)
        info = check_gguf_file(path_str)
        repack = _preflight.repack_setting(repack)
        check = None
        if _preflight.enabled(preflight):
            check = _preflight.Preflight(path_str, load_mtp, repack)
            contexts = cls._load_time_contexts(info, load_mtp)
            # Every weight on a GPU: the trial does not repack (its copy would cost the child
            # the model's size). Any layer left on the CPU: it does, as the load will.
            all_layers = info["n_layer"] + info["n_layer_nextn"]
            all_offloaded = (n_gpu_layers < 0 or n_gpu_layers > all_layers) and (mtp_device or "").upper() != "CPU" \
                and any(d.type in ("gpu", "igpu") for d in _lowlevel.devices() if devices is None or d.name in devices)
            repack = check.check_load(contexts, compute=2 if any(c.mtp for c in contexts) else 1,
                                      weights_on_cpu=not all_offloaded)
        overrides = None
        if mtp_device is not None and load_mtp and info["n_layer_nextn"] > 0:
            blocks = "|".join(str(info["n_layer"] + i) for i in range(info["n_layer_nextn"]))
            overrides = [(rf"^blk\.({blocks})\.", mtp_device)]
        native = _lowlevel.NativeModel(
            path_str, n_gpu_layers=n_gpu_layers, load_mtp=load_mtp, use_mmap=use_mmap, repack=repack is not False,
            progress=progress, devices=list(devices) if devices is not None else None,
            overrides=overrides)
        try:
            return cls(native, path_str, load_mtp, check)
        except BaseException:
            native.free()  # nothing else owns it yet
            raise

    @staticmethod
    def _load_time_contexts(info: dict, load_mtp: bool) -> list[_lowlevel.ContextConfig]:
        """What the load's pre-flight builds: a default context and, where the model can
        draft, its MTP context (a model is only sound if both can be made)."""
        plain = _lowlevel.ContextConfig(n_ctx=2048, n_batch=512, n_ubatch=512)
        contexts = [plain]
        n_nextn = info["n_layer_nextn"]
        if load_mtp and n_nextn > 0 and not (n_nextn > 1 and info["architecture"] in SINGLE_MTP_BLOCK_ARCHES):
            contexts.append(_lowlevel.ContextConfig(n_ctx=2048, n_batch=512, n_ubatch=512, mtp=True))
        return contexts

    def _preflight_context(self, config: _lowlevel.ContextConfig,
                           target: Optional[_lowlevel.ContextConfig]) -> None:
        """Check a context of this shape (an MTP one after its target's) in a child first."""
        if self._preflight is not None:
            self._preflight.check_context([target, config] if target is not None else [config])

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Release the weights now, or when the last open context closes."""
        super().close()

    def _release(self) -> None:
        if self._chat_template is not None:
            self._chat_template.close()
        self._free_when_unused()

    # -- properties -------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def architecture(self) -> str:
        return self._metadata.get("general.architecture", "")

    @property
    def description(self) -> str:
        return self._hparams["description"]

    @property
    def n_vocab(self) -> int:
        return self._hparams["n_vocab"]

    @property
    def n_embd(self) -> int:
        return self._hparams["n_embd"]

    @property
    def n_layer(self) -> int:
        """Trunk layers (MTP blocks not counted)."""
        return self._hparams["n_layer"]

    @property
    def n_layer_nextn(self) -> int:
        """MTP (nextn) blocks in the file."""
        return self._hparams["n_layer_nextn"]

    @property
    def has_mtp(self) -> bool:
        """The file has MTP layers (whether or not they were loaded)."""
        return self.n_layer_nextn > 0

    @property
    def mtp_loaded(self) -> bool:
        """MTP layers are in memory, so this model can draft."""
        return self._mtp_loaded

    @property
    def mtp_weight_bytes(self) -> int:
        """Bytes of the MTP (nextn) blocks' tensors in the file (0 without MTP layers)."""
        if self._mtp_bytes is None:
            from gguf import GGUFReader  # read lazily: only the tensor table is touched

            prefixes = tuple(f"blk.{self.n_layer + i}." for i in range(self.n_layer_nextn))
            reader = GGUFReader(self._path, "r")
            self._mtp_bytes = sum(int(t.n_bytes) for t in reader.tensors
                                  if prefixes and t.name.startswith(prefixes))
        return self._mtp_bytes

    @property
    def n_ctx_train(self) -> int:
        return self._hparams["n_ctx_train"]

    @property
    def size(self) -> int:
        """Bytes of all tensors."""
        return self._hparams["size"]

    @property
    def n_params(self) -> int:
        return self._hparams["n_params"]

    @property
    def is_recurrent(self) -> bool:
        return self._hparams["is_recurrent"]

    @property
    def is_hybrid(self) -> bool:
        """Attention plus recurrent layers (e.g. qwen35's gated delta-net)."""
        return self._hparams["is_hybrid"]

    @property
    def metadata(self) -> dict[str, str]:
        """GGUF key/value metadata (scalars as strings; arrays are left out by llama.cpp)."""
        return dict(self._metadata)

    @property
    def bos(self) -> int:
        return self._hparams["bos"]

    @property
    def eos(self) -> int:
        return self._hparams["eos"]

    @property
    def eot(self) -> int:
        return self._hparams["eot"]

    # -- vocabulary -------------------------------------------------------------------
    def tokenize(self, text: Union[str, bytes], *, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        """Text to token ids; ``add_special`` adds BOS/EOS where the model asks for them."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self._live_native().tokenize(data, add_special, parse_special).tolist()

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        self.check_tokens([token])
        return self._live_native().token_to_piece(int(token), special)

    def detokenize(self, tokens: Iterable[int], *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        array = self.check_tokens(tokens)
        data = self._live_native().detokenize(array, remove_special, unparse_special)
        return data.decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        return self._live_native().is_eog(int(token))

    def check_tokens(self, tokens: Iterable[int]) -> np.ndarray:
        """Token ids as int32, or InvalidArgumentError naming the first bad one."""
        array = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens)
        if array.ndim != 1:
            raise InvalidArgumentError(f"tokens must be one-dimensional, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise InvalidArgumentError(f"tokens must be integers, got dtype {array.dtype}")
        bad = np.flatnonzero((array < 0) | (array >= self.n_vocab))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgumentError(
                f"token id {int(array[i])} at index {i} is outside the vocabulary [0, {self.n_vocab})")
        return array.astype(np.int32, copy=False)

    # -- chat ---------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        """The model's own chat template (GGUF ``tokenizer.chat_template``), loaded by
        llama.cpp as llama-server loads it (ChatML when the file has none)."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate(model=self)
        return self._chat_template

    @property
    def chat_template_names(self) -> list[str]:
        """Names of the file's extra templates (``tokenizer.chat_template.<name>``)."""
        prefix = "tokenizer.chat_template."
        return sorted(key[len(prefix):] for key in self._metadata if key.startswith(prefix))

    def named_chat_template(self, name: str) -> ChatTemplate:
        """One of :attr:`chat_template_names` (e.g. ``"tool_use"``); the caller closes it."""
        source = self._metadata.get(f"tokenizer.chat_template.{name}")
        if source is None:
            raise InvalidArgumentError(f"no chat template named {name!r} (have: {self.chat_template_names})")
        return ChatTemplate(source)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            tools: Optional[Sequence[Mapping[str, Any]]] = None,
                            add_generation_prompt: bool = True, enable_thinking: Optional[bool] = None,
                            **kwargs: Any) -> str:
        """Render ``messages`` (OpenAI shapes) with the model's template, as llama-server
        does; see :meth:`ChatTemplate.render` for the other arguments."""
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, **kwargs).prompt

    # -- convenience ------------------------------------------------------------------
    def context(self, **kwargs: Any) -> Context:
        """Create a :class:`~pyllama_mtp.Context` on this model (same arguments)."""
        return Context(self, **kwargs)

    def mtp_context(self, target: Context, *, n_threads: Optional[int] = None) -> Context:
        """Create the MTP draft context for ``target``: the same weights, its own small KV.

        No weight is loaded twice: the draft context runs this model's MTP (nextn) layers,
        with as many positions and sequences as the target and its flash-attention setting.

        Raises:
            NoMTPError: the model has no MTP layers, or was loaded with ``load_mtp=False``.
        """
        if target.model is not self:
            raise InvalidArgumentError("the target context belongs to another model")
        if self.n_layer_nextn > 1 and self.architecture in SINGLE_MTP_BLOCK_ARCHES:
            raise NoMTPError(
                f"{self.architecture} with {self.n_layer_nextn} MTP blocks: the pinned llama.cpp runs "
                f"a single MTP block for this architecture (strip the extra blocks to draft)")
        # Same attention kernel choice as the target, as upstream builds its drafter.
        return Context(self, n_ctx=target.n_ctx, n_batch=target.n_batch, n_ubatch=target.n_ubatch,
                       n_seq_max=target.n_seq_max, n_threads=n_threads or target.n_threads,
                       flash_attn=target.flash_attn, _mtp_target=target)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.architecture}, {self.n_params:,} params"
        return f"<Model {os.path.basename(self._path)!r} ({state})>"


def quantize(source: PathLike, destination: PathLike, ftype: str = "q8_0", *,
             n_threads: Optional[int] = None, pure: bool = False) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (MTP layers included).

    ``ftype``: one of ``f32, f16, bf16, q4_0, q8_0, q4_k_s, q4_k_m, q5_k_m, q6_k``;
    ``pure`` uses that type for every tensor instead of llama.cpp's per-tensor mix.
    """
    source_str, destination_str = os.fspath(source), os.fspath(destination)
    key = ftype.lower()
    if key not in _lowlevel.QUANT_TYPES:
        raise InvalidArgumentError(f"unknown quantization {ftype!r}; choose from {', '.join(_lowlevel.QUANT_TYPES)}")
    if not os.path.isfile(source_str):
        raise ModelLoadError(f"no such model file: {source_str}")
    check_gguf_file(source_str)
    if _preflight.enabled(None):
        _preflight.Preflight(source_str, True).check_context([])
    _lowlevel.quantize(source_str, destination_str, key, n_threads or _lowlevel.default_threads(), pure)
