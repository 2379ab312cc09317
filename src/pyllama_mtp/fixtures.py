"""Tiny, deterministic GGUF test models with MTP ("nextn") heads.

The models are written with the ``gguf`` package from seeded numpy weights, load in
the pinned llama.cpp and decode a few thousand tokens a second on one CPU core.

How the weights make MTP acceptance tunable
-------------------------------------------
Random weights would make an MTP head agree with the trunk almost never, so the
weights follow a *successor rule*:

* ``succ`` is a random permutation of the ordinary (non-special) tokens; it is stored
  in the file under the key ``pyllama_mtp.fixture.succ`` (see :func:`successor_map`).
* The residual stream starts as the embedding ``E[t]`` of the current token ``t``; the
  untied output head has row ``succ(t)`` equal to ``E[t]`` (unit-normalised), so a
  hidden state close to ``E[t]`` scores ``succ(t)`` highest.
* Every attention / gated-delta-net / FFN block adds a context-dependent term whose
  output projection is scaled by ``eps``. With small ``eps`` the greedy next token is
  ``succ(t)``; as ``eps`` grows, context (attention over the KV cache, the recurrent
  delta-net state and its short convolution) overrides the rule at some positions, and
  the next token depends on the whole history. A KV-cache or recurrent-state rollback
  mistake therefore changes the output.
* The MTP block sees the trunk's hidden state at position ``t`` and the embedding of
  token ``t+1``; its ``eh_proj`` passes the embedding half through and the block's own
  attention / FFN are weak, so the head predicts ``succ(x[t+1])``. It agrees with the
  trunk exactly where context did not override the rule, so the MTP acceptance rate is
  about the rule-agreement rate measured by :func:`measure_rule_agreement`.

Measured eps -> agreement (:func:`measure_rule_agreement` with its defaults: 3 prompts
x 200 greedy tokens; n_embd 64, 4 trunk layers, f32; pinned llama.cpp on CPU; mean of
seeds 0, 1, 2, the seed-to-seed spread is a few points, up to ~0.08 on the steep part).
``acceptance=`` maps to ``eps`` by interpolating these rows (:data:`EPS_TABLE`), scaled
for other sizes (below); tests should still measure rather than assume.

=====  ======  =======
eps    qwen35  glm4moe
=====  ======  =======
0.5    1.000   1.000
0.75   -       1.000
1.0    0.998   0.974
1.25   0.980   0.896
1.5    0.945   0.744
1.75   0.849   0.583
2.0    0.770   0.461
2.25   0.623   -
2.5    0.530   0.280
3.0    0.373   0.151
4.0    0.180   -
=====  ======  =======

Other sizes: the agreement at a given ``eps`` rises with ``n_embd`` (the successor
logit grows like ``sqrt(n_embd)``, the context terms' effect on competing logits does
not) and falls with ``n_layer`` (the context terms add up), so ``acceptance=`` uses
``eps = table_eps(acceptance) * sqrt((n_embd / 64) * (4 / n_layer))``
(:func:`eps_for_acceptance`; scale 1 at 64 x 4, so those files are unchanged). Checked
(seed 0, defaults of :func:`measure_rule_agreement`, head dim 16) at the eps this gives
for 0.75: qwen35 256 x 4 (eps 4.07) 0.78, 512 x 4 (5.75) 0.75, 64 x 8 (1.44) 0.77;
glm4moe 256 x 4 (2.98) 0.77, 64 x 8 (1.05) 0.73; qwen35 1024 x 8 f16 (rule: 5.75; 100
tokens a prompt) gave 0.99 at eps 4 and 0.74 at eps 6. A larger ``head_dim`` shifts
the curve (1024 x 12 with head dim 64 needs ~6% more eps than the rule gives) and is
not corrected for; ``n_ff`` does not enter (FFN outputs are normalised by the width).

Chained MTP heads (``n_mtp > 1``): the file gets ``n_mtp`` MTP blocks after the trunk,
each built like the single one, so every head of a chain (head ``i`` drafts position
``i``, ``llama_set_nextn_layer_offset(ctx, i)``) predicts ``succ`` of its input token,
and with ``n_mtp = 1`` the bytes are those of earlier versions. The pinned llama.cpp
loads these files for both arches (``llama_model_n_layer_nextn == n_mtp``, the trunk
decodes normally), but cannot run them as drafters: ``graph_mtp`` of qwen35
(``src/models/qwen35.cpp``) and of glm4moe (``src/models/glm4-moe.cpp``) both
``GGML_ASSERT(hparams.n_layer_nextn == 1)``, so creating an MTP context from such a file
aborts the process (in ``llama_init_from_model`` -> ``sched_reserve`` -> ``graph_mtp``).
qwen35's graph would not chain anyway (it always uses layer ``n_layer`` and ignores
the offset); glm4moe's reads the offset but keeps the assert. Only step35, mimo2 and
hy-v3 build a per-offset head without that assert.

Demo model (:func:`make_demo_model`, :data:`DEMO_CONFIG`): qwen35, n_embd 1024, 12
trunk layers, head dim 64, n_ff 2048, f32, one MTP block: 133.9 M parameters, a 536 MB
file written in ~4 s. Tiny fixtures are overhead-bound and MTP makes them slower; at
this size plain decoding reads ~0.5 GB of weights a token and is memory-bound on a
small CPU, so verifying several tokens at once costs ~1.3-1.5x one token and MTP wins.
Head dim 64 because CPU flash attention (on by default) is slow for many 16-wide heads
(an 8-token batch cost twice as much as without it). f16 halves the file (268 MB) but
gains nothing: plain ~98 tokens/s, MTP n_draft 3 ~95-102 (its multi-token batches cost
relatively more than f32's). Agreement
measured at this size (:data:`DEMO_EPS_TABLE`, seed 0, 3 prompts x 200 tokens): eps 3
0.997, 3.5 0.99, 4 0.917, 4.5 0.845, 5 0.748 (seeds 1, 2: 0.715, 0.758), 5.5 0.667,
6 0.583, 7 0.39, 8 0.283. At the default 0.75 (eps 4.99): rule agreement 0.72, the MTP
head's :func:`measure_mtp_agreement` 0.745. On a 2-core AMD EPYC VM (AVX-512, n_threads
2, flash attention default, 200 greedy tokens after "The quick brown fox", three runs,
memory bandwidth varies from run to run): plain 45-53 tokens/s; MTP n_draft 1: 62-70
(first-position acceptance 80%), 2: 69-80 (66% of drafts accepted), 3: 74-85 (59%),
4: 72-87 (50%); every run token-identical to plain greedy decoding. Those figures are
for the byte vocabulary (:data:`DEMO_EPS_TABLE`); the demo model itself now recites
:data:`DEMO_TEXT` (:func:`text_vocab`, :data:`DEMO_TEXT_EPS_TABLE`): at its default
acceptance 0.9 (eps 4.78), 128 tokens after "The quick brown fox" on a 2-core Intel Xeon
VM: plain 49 tokens/s, MTP n_draft 3 107 tokens/s (2.16x, 80% of drafts accepted).

The trunk does not depend on ``mtp``: for one seed and eps, ``mtp=True`` and
``mtp=False`` write the same trunk tensors (the MTP block is drawn last).

Numerics: near-ties between the top two logits are rare but not absent (about 1% of
greedy steps have a top-2 margin under 0.01). On CPU, flash attention (the default
``AUTO``) moves logits by up to ~0.3 between a batched and a one-token-at-a-time
decode of the same sequence, enough to flip the greedy token at ~0.1-0.2% of steps for
glm4moe; with flash attention disabled the difference stays under ~4e-3 and no flips
were seen in 900 steps per arch. Tests that compare a speculative run with a plain
greedy run token for token should disable flash attention and keep runs moderate.

Context sensitivity (measured at the 0.75 defaults): replacing one token 2-10 positions
back in a 100-300 token history changes the greedy continuation within 30 tokens in
~100% of trials for qwen35 and ~85% for glm4moe; prompts with the same last token but
different history diverge at the first generated token. The model's real MTP head
(:func:`measure_mtp_agreement`, an ``LLAMA_CONTEXT_TYPE_MTP`` context fed the trunk's
``h_nextn``) agrees with the trunk at the same rate as the rule proxy (within ~0.02).

llama.cpp notes: ``llama_model_n_layer`` counts trunk layers only; an MTP file loaded
with ``load_mtp = false`` still reports ``llama_model_n_layer_nextn == 1`` (the MTP
tensors are skipped with "unused tensor" warnings), and creating an MTP context from
such a model aborts the process in ``graph_mtp`` (GGML_ASSERT on ``nextn.eh_proj``)
instead of returning NULL; an MTP context on a model without MTP layers returns NULL.

Public API: :func:`make_model`, :func:`make_demo_model`, :func:`eps_for_acceptance`,
:func:`successor_map`, :func:`fixture_info`,
:func:`byte_vocab`, :func:`text_vocab`, :func:`greedy_generate`, :func:`measure_rule_agreement`,
:func:`measure_mtp_agreement`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "ARCHES",
    "EPS_TABLE",
    "SUCC_KEY",
    "make_model",
    "make_demo_model",
    "DEMO_CONFIG",
    "DEMO_EPS_TABLE",
    "DEMO_TEXT",
    "DEMO_TEXT_EPS_TABLE",
    "eps_for_acceptance",
    "successor_map",
    "fixture_info",
    "byte_vocab",
    "text_vocab",
    "greedy_generate",
    "measure_rule_agreement",
    "measure_mtp_agreement",
]

#: Bump whenever the bytes written for a given parameter set change.
GENERATOR_VERSION = 1

ARCHES = ("qwen35", "glm4moe")

#: GGUF key holding the successor permutation (int32 array over the ordinary tokens).
SUCC_KEY = "pyllama_mtp.fixture.succ"
_INFO_KEY = "pyllama_mtp.fixture.info"

#: Measured eps -> rule agreement (acceptance proxy), ascending eps. See module doc.
EPS_TABLE: Dict[str, List[Tuple[float, float]]] = {
    "qwen35": [(0.5, 1.0), (1.0, 0.998), (1.25, 0.98), (1.5, 0.945), (1.75, 0.849), (2.0, 0.77),
               (2.25, 0.623), (2.5, 0.53), (3.0, 0.373), (4.0, 0.18)],
    "glm4moe": [(0.75, 1.0), (1.0, 0.974), (1.25, 0.896), (1.5, 0.744), (1.75, 0.583), (2.0, 0.461),
                (2.5, 0.28), (3.0, 0.151)],
}

_DEFAULT_ACCEPTANCE = 0.75
_BASE_EMBD, _BASE_LAYER = 64, 4  # the size EPS_TABLE was measured at

# ---------------------------------------------------------------------------
# Tokenizer: byte-level BPE (GPT-2 byte-to-unicode), a few merges, BOS/EOS.
# ---------------------------------------------------------------------------

_MERGES = ("Ġ t", "h e", "i n", "e r", "Ġ a")
_BOS_TEXT = "<|startoftext|>"
_EOS_TEXT = "<|endoftext|>"


def _bytes_to_unicode() -> Dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class _Vocab(NamedTuple):
    """Everything the writer and the output head need to know about a vocabulary."""

    tokens: List[str]
    types: List[int]
    merges: Tuple[str, ...]
    n_ordinary: int
    bos: int
    eos: int
    #: the successor rule fixed by the vocabulary (``-1``: never produced), or None
    #: for a random permutation of the ordinary tokens drawn with the weights
    rule: Optional[np.ndarray] = None


def _byte_vocab() -> _Vocab:
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in _MERGES]
    n_ordinary = len(tokens)
    tokens += [_BOS_TEXT, _EOS_TEXT]
    types = [1] * n_ordinary + [3, 3]  # NORMAL, CONTROL
    return _Vocab(tokens, types, _MERGES, n_ordinary, n_ordinary, n_ordinary + 1)


def byte_vocab() -> Tuple[List[str], List[int], int, int, int]:
    """The fixture vocabulary: ``(tokens, token_types, n_ordinary, bos_id, eos_id)``.

    Ids 0..255 are the bytes 0..255 (GPT-2 byte-to-unicode text), then one token per
    merge, then BOS and EOS (control tokens). ``n_ordinary`` counts the non-special ones.
    """
    vocab = _byte_vocab()
    return vocab.tokens, vocab.types, vocab.n_ordinary, vocab.bos, vocab.eos


def text_vocab(text: str) -> _Vocab:
    """A vocabulary whose successor rule recites ``text`` word by word, in a loop.

    Ids 0..255 are the bytes (any text still tokenizes), then for each word of
    ``text`` the token " word" (GPT-2 byte-to-unicode form, punctuation attached) and
    the prefixes its BPE merges pass through, then BOS and EOS. The rule maps each
    word to the next (the last to the first) and nothing else: the output head scores
    only word tokens, so wherever context overrides the rule the model still writes a
    word of ``text`` and the output stays readable. Every word must occur once.
    """
    words = text.split()
    repeated = sorted({word for word in words if words.count(word) > 1})
    if len(words) < 2 or repeated:
        raise ValueError(f"text needs two or more words, each once; repeated: {repeated}")
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    index = {token: i for i, token in enumerate(tokens)}
    word_ids, merges = [], []
    for word in words:
        spelled = "".join(b2u[b] for b in (" " + word).encode())
        # Left-to-right merges through every prefix; ranked below by prefix length, so
        # each word merges fully (only a leading " " ever starts a merge).
        for k in range(2, len(spelled) + 1):
            prefix = spelled[:k]
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(prefix)
                merges.append((k, f"{spelled[:k - 1]} {spelled[k - 1]}"))
        word_ids.append(index[spelled])
    n_ordinary = len(tokens)
    tokens += [_BOS_TEXT, _EOS_TEXT]
    types = [1] * n_ordinary + [3, 3]
    rule = np.full(n_ordinary, -1, dtype=np.int32)
    rule[word_ids] = np.roll(word_ids, -1)
    ranked = tuple(merge for _, merge in sorted(merges, key=lambda item: item[0]))
    return _Vocab(tokens, types, ranked, n_ordinary, n_ordinary, n_ordinary + 1, rule)


# ---------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------

_HEAD_DIM = 16
_N_ROT = 8
_ROPE_SECTIONS = [2, 1, 1, 0]
_SSM_STATE = 16
_SSM_GROUPS = 2
_CONV_KERNEL = 4
_N_CTX_TRAIN = 4096
_RMS_EPS = 1e-6
_LOGIT_GAIN = 1.0  # top logit ~ 8 * gain with n_embd 64
# q/k norm weights: attention sharp enough to pick out specific tokens (sharper also
# amplifies flash-attention's f16 rounding, see the module doc)
_QK_GAIN = {"qwen35": 1.5, "glm4moe": 2.0}


def _qk_gain(arch: str, head_dim: int) -> float:
    # attention logits grow like gain**2 * sqrt(head_dim): keep them at the 16-dim sharpness
    if head_dim == _HEAD_DIM:
        return _QK_GAIN[arch]
    return _QK_GAIN[arch] * (_HEAD_DIM / head_dim) ** 0.25
_FFN_EPS_RATIO = 0.5  # FFN output projections are scaled by eps * this
_MTP_WEAK = 0.05  # scale of the MTP block's own attention / FFN output projections
_MTP_H_MIX = 0.1  # how much of the trunk hidden state eh_proj lets through

# GLM-4.5-style MoE sizes
_N_EXPERT = 4
_N_EXPERT_USED = 2
_N_EXPERT_SHARED = 1
_N_DENSE_LEAD = 1
_ROUTED_RATIO = 0.3  # routed experts are weaker than the shared one: a near-tie routing flip moves little


def _cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("PYLLAMA_MTP_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "pyllama_mtp" / "models"


def eps_for_acceptance(arch: str, acceptance: float, *, n_embd: int = _BASE_EMBD,
                       n_layer: int = _BASE_LAYER) -> float:
    """The ``eps`` whose rule agreement is ``acceptance`` for a model of this size.

    Interpolates the measured :data:`EPS_TABLE` (n_embd 64, 4 layers) and scales the
    result by ``sqrt((n_embd / 64) * (4 / n_layer))`` (see "Other sizes" in the module
    doc): at 64 x 4 the scale is 1 and the result is the table's.
    """
    if arch not in EPS_TABLE:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    if not 0.0 < acceptance <= 1.0:
        raise ValueError("acceptance must be in (0, 1]")
    base = _interp_eps(EPS_TABLE[arch], acceptance, arch)
    return round(base * _size_scale(n_embd, n_layer), 4)


def _interp_eps(table: Sequence[Tuple[float, float]], acceptance: float, label: str) -> float:
    eps = np.array([e for e, _ in table], dtype=np.float64)
    agr = np.array([a for _, a in table], dtype=np.float64)
    lo, hi = float(agr.min()), float(agr.max())
    if not lo <= acceptance <= hi:
        raise ValueError(
            f"acceptance {acceptance} is outside the measured range [{lo:.2f}, {hi:.2f}] for {label}; "
            "pass eps= directly"
        )
    # agreement falls as eps grows: interpolate on the reversed (ascending) table
    return float(np.interp(acceptance, agr[::-1], eps[::-1]))


def _size_scale(n_embd: int, n_layer: int) -> float:
    if n_embd == _BASE_EMBD and n_layer == _BASE_LAYER:
        return 1.0
    return float(np.sqrt((n_embd / _BASE_EMBD) * (_BASE_LAYER / n_layer)))


class _W:
    """Seeded weight factory (numpy order: out x in, i.e. ggml shapes reversed)."""

    def __init__(self, seed: int, ftype: str):
        self.rng = np.random.default_rng(seed)
        self.ftype = ftype
        self.tensors: Dict[str, np.ndarray] = {}

    def lin(self, n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal((n_out, n_in)) * (scale / np.sqrt(n_in))).astype(np.float32)

    def ones(self, n: int, value: float = 1.0) -> np.ndarray:
        return np.full((n,), value, dtype=np.float32)

    def add(self, name: str, arr: np.ndarray, keep_f32: bool = False) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if self.ftype == "f16" and arr.ndim >= 2 and not keep_f32:
            arr = arr.astype(np.float16)
        self.tensors[name] = arr


def _common_head(w: _W, n_embd: int, vocab: _Vocab) -> Tuple[np.ndarray, np.ndarray]:
    """token_embd, output head and the successor rule."""
    n_vocab, n_ordinary = len(vocab.tokens), vocab.n_ordinary
    emb = w.rng.standard_normal((n_vocab, n_embd)).astype(np.float32)
    succ = w.rng.permutation(n_ordinary).astype(np.int32)
    if vocab.rule is not None:
        succ = vocab.rule
    unit = emb[:n_ordinary] / np.linalg.norm(emb[:n_ordinary], axis=1, keepdims=True)
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)  # rows left 0: logit 0, never the max
    ruled = succ >= 0
    out[succ[ruled]] = unit[ruled] * _LOGIT_GAIN  # row succ[t] = E[t]: hidden ~ E[t] -> succ[t] wins
    w.add("token_embd.weight", emb)
    w.add("output_norm.weight", w.ones(n_embd))
    w.add("output.weight", out)
    return out, succ


def _dense_ffn(w: _W, p: str, n_embd: int, n_ff: int, out_scale: float) -> None:
    w.add(f"{p}.ffn_gate.weight", w.lin(n_ff, n_embd))
    w.add(f"{p}.ffn_up.weight", w.lin(n_ff, n_embd))
    w.add(f"{p}.ffn_down.weight", w.lin(n_embd, n_ff, out_scale))


def _nextn(w: _W, p: str, n_embd: int) -> None:
    eh = np.concatenate([np.eye(n_embd, dtype=np.float32), w.lin(n_embd, n_embd, _MTP_H_MIX)], axis=1)
    w.add(f"{p}.nextn.eh_proj.weight", eh)  # ggml {2*n_embd, n_embd}: [embedding half | hidden half]
    w.add(f"{p}.nextn.enorm.weight", w.ones(n_embd))
    w.add(f"{p}.nextn.hnorm.weight", w.ones(n_embd))


def _build_qwen35(w: _W, n_embd: int, n_layer: int, n_mtp: int, eps: float, vocab: _Vocab,
                  n_ff: int, head_dim: int):
    qk_gain = _qk_gain("qwen35", head_dim)
    n_head = n_embd // head_dim
    n_head_kv = max(1, n_head // 2)
    dt_rank = n_embd // _SSM_STATE  # value heads
    d_inner = dt_rank * _SSM_STATE
    key_dim = _SSM_GROUPS * _SSM_STATE
    conv_dim = 2 * key_dim + d_inner
    interval = 2

    out, succ = _common_head(w, n_embd, vocab)

    def attn_block(p: str, out_scale: float) -> None:
        # joint Q + gate projection: per head [q(16) | gate(16)]
        w.add(f"{p}.attn_q.weight", w.lin(2 * n_head * head_dim, n_embd))
        w.add(f"{p}.attn_k.weight", w.lin(n_head_kv * head_dim, n_embd))
        w.add(f"{p}.attn_v.weight", w.lin(n_head_kv * head_dim, n_embd))
        w.add(f"{p}.attn_output.weight", w.lin(n_embd, n_head * head_dim, out_scale))
        w.add(f"{p}.attn_q_norm.weight", w.ones(head_dim, qk_gain))
        w.add(f"{p}.attn_k_norm.weight", w.ones(head_dim, qk_gain))

    for il in range(n_layer):
        p = f"blk.{il}"
        w.add(f"{p}.attn_norm.weight", w.ones(n_embd))
        w.add(f"{p}.post_attention_norm.weight", w.ones(n_embd))
        if (il + 1) % interval != 0:  # gated delta net
            w.add(f"{p}.attn_qkv.weight", w.lin(conv_dim, n_embd))
            w.add(f"{p}.attn_gate.weight", w.lin(d_inner, n_embd))
            w.add(f"{p}.ssm_conv1d.weight", (0.5 * w.rng.standard_normal((conv_dim, _CONV_KERNEL))).astype(np.float32), keep_f32=True)
            w.add(f"{p}.ssm_dt.bias", np.zeros(dt_rank, dtype=np.float32))
            # ssm_a = -exp(A_log): per-step decay exp(softplus(.) * a) between ~0.97 and ~0.7
            w.add(f"{p}.ssm_a", -w.rng.uniform(0.05, 0.5, dt_rank).astype(np.float32))
            w.add(f"{p}.ssm_beta.weight", w.lin(dt_rank, n_embd))
            w.add(f"{p}.ssm_alpha.weight", w.lin(dt_rank, n_embd, 0.5))
            w.add(f"{p}.ssm_norm.weight", w.ones(_SSM_STATE))
            w.add(f"{p}.ssm_out.weight", w.lin(n_embd, d_inner, eps))
        else:
            attn_block(p, eps)
        _dense_ffn(w, p, n_embd, n_ff, eps * _FFN_EPS_RATIO)

    for i in range(n_mtp):  # chained heads: every head follows the rule on its own input token
        p = f"blk.{n_layer + i}"
        w.add(f"{p}.attn_norm.weight", w.ones(n_embd))
        w.add(f"{p}.post_attention_norm.weight", w.ones(n_embd))
        attn_block(p, _MTP_WEAK)
        _dense_ffn(w, p, n_embd, n_ff, _MTP_WEAK)
        _nextn(w, p, n_embd)

    kv = {
        "context_length": ("u32", _N_CTX_TRAIN),
        "embedding_length": ("u32", n_embd),
        "block_count": ("u32", n_layer + n_mtp),
        "feed_forward_length": ("u32", n_ff),
        "attention.head_count": ("u32", n_head),
        "attention.head_count_kv": ("u32", n_head_kv),
        "attention.key_length": ("u32", head_dim),
        "attention.value_length": ("u32", head_dim),
        "attention.layer_norm_rms_epsilon": ("f32", _RMS_EPS),
        "rope.dimension_count": ("u32", _N_ROT),
        "rope.dimension_sections": ("i32[]", _ROPE_SECTIONS),
        "rope.freq_base": ("f32", 10000.0),
        "ssm.conv_kernel": ("u32", _CONV_KERNEL),
        "ssm.inner_size": ("u32", d_inner),
        "ssm.state_size": ("u32", _SSM_STATE),
        "ssm.time_step_rank": ("u32", dt_rank),
        "ssm.group_count": ("u32", _SSM_GROUPS),
        "full_attention_interval": ("u32", interval),
    }
    if n_mtp:
        kv["nextn_predict_layers"] = ("u32", n_mtp)
    return kv, succ


def _build_glm4moe(w: _W, n_embd: int, n_layer: int, n_mtp: int, eps: float, vocab: _Vocab,
                   n_ff: int, head_dim: int):
    qk_gain = _qk_gain("glm4moe", head_dim)
    n_head = n_embd // head_dim
    n_head_kv = max(1, n_head // 2)
    n_ff_exp = n_embd // 2
    n_q = n_head * head_dim
    n_kv = n_head_kv * head_dim

    out, succ = _common_head(w, n_embd, vocab)

    def block(il: int, attn_scale: float, ffn_scale: float) -> None:
        p = f"blk.{il}"
        w.add(f"{p}.attn_norm.weight", w.ones(n_embd))
        w.add(f"{p}.post_attention_norm.weight", w.ones(n_embd))
        w.add(f"{p}.attn_q.weight", w.lin(n_q, n_embd))
        w.add(f"{p}.attn_k.weight", w.lin(n_kv, n_embd))
        w.add(f"{p}.attn_v.weight", w.lin(n_kv, n_embd))
        w.add(f"{p}.attn_q.bias", (0.1 * w.rng.standard_normal(n_q)).astype(np.float32))
        w.add(f"{p}.attn_k.bias", (0.1 * w.rng.standard_normal(n_kv)).astype(np.float32))
        w.add(f"{p}.attn_v.bias", (0.1 * w.rng.standard_normal(n_kv)).astype(np.float32))
        w.add(f"{p}.attn_output.weight", w.lin(n_embd, n_q, attn_scale))
        w.add(f"{p}.attn_q_norm.weight", w.ones(head_dim, qk_gain))
        w.add(f"{p}.attn_k_norm.weight", w.ones(head_dim, qk_gain))
        if il < _N_DENSE_LEAD:
            _dense_ffn(w, p, n_embd, n_ff, ffn_scale)
        else:
            w.add(f"{p}.ffn_gate_inp.weight", w.lin(_N_EXPERT, n_embd), keep_f32=True)
            w.add(f"{p}.exp_probs_b.bias", np.zeros(_N_EXPERT, dtype=np.float32))
            gate = np.stack([w.lin(n_ff_exp, n_embd) for _ in range(_N_EXPERT)])
            up = np.stack([w.lin(n_ff_exp, n_embd) for _ in range(_N_EXPERT)])
            down = np.stack([w.lin(n_embd, n_ff_exp, ffn_scale * _ROUTED_RATIO) for _ in range(_N_EXPERT)])
            w.add(f"{p}.ffn_gate_exps.weight", gate)  # ggml {n_embd, n_ff_exp, n_expert}
            w.add(f"{p}.ffn_up_exps.weight", up)
            w.add(f"{p}.ffn_down_exps.weight", down)  # ggml {n_ff_exp, n_embd, n_expert}
            n_ff_sh = n_ff_exp * _N_EXPERT_SHARED
            _dense_ffn_named(w, p, n_embd, n_ff_sh, ffn_scale, "shexp")

    for il in range(n_layer):
        block(il, eps, eps * _FFN_EPS_RATIO)

    for i in range(n_mtp):
        block(n_layer + i, _MTP_WEAK, _MTP_WEAK)
        p = f"blk.{n_layer + i}"
        _nextn(w, p, n_embd)
        # GLM-4.5 MTP blocks carry their own head norm and LM head (optional in the loader)
        w.add(f"{p}.nextn.shared_head_norm.weight", w.ones(n_embd))
        w.add(f"{p}.nextn.shared_head_head.weight", out.copy())

    kv = {
        "context_length": ("u32", _N_CTX_TRAIN),
        "embedding_length": ("u32", n_embd),
        "block_count": ("u32", n_layer + n_mtp),
        "feed_forward_length": ("u32", n_ff),
        "expert_feed_forward_length": ("u32", n_ff_exp),
        "attention.head_count": ("u32", n_head),
        "attention.head_count_kv": ("u32", n_head_kv),
        "attention.key_length": ("u32", head_dim),
        "attention.value_length": ("u32", head_dim),
        "attention.layer_norm_rms_epsilon": ("f32", _RMS_EPS),
        "rope.dimension_count": ("u32", _N_ROT),
        "rope.freq_base": ("f32", 10000.0),
        "expert_count": ("u32", _N_EXPERT),
        "expert_used_count": ("u32", _N_EXPERT_USED),
        "expert_shared_count": ("u32", _N_EXPERT_SHARED),
        "leading_dense_block_count": ("u32", _N_DENSE_LEAD),
        "expert_weights_scale": ("f32", 1.0),
        "expert_weights_norm": ("bool", True),
        "expert_gating_func": ("u32", 2),  # sigmoid
    }
    if n_mtp:
        kv["nextn_predict_layers"] = ("u32", n_mtp)
    return kv, succ


def _dense_ffn_named(w: _W, p: str, n_embd: int, n_ff: int, out_scale: float, suffix: str) -> None:
    w.add(f"{p}.ffn_gate_{suffix}.weight", w.lin(n_ff, n_embd))
    w.add(f"{p}.ffn_up_{suffix}.weight", w.lin(n_ff, n_embd))
    w.add(f"{p}.ffn_down_{suffix}.weight", w.lin(n_embd, n_ff, out_scale))


_BUILDERS = {"qwen35": _build_qwen35, "glm4moe": _build_glm4moe}


def make_model(
    arch: str = "qwen35",
    *,
    mtp: bool = True,
    acceptance: Optional[float] = None,
    eps: Optional[float] = None,
    n_embd: int = 64,
    n_layer: int = 4,
    seed: int = 0,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    ftype: str = "f32",
    n_mtp: int = 1,
    n_ff: Optional[int] = None,
    head_dim: int = _HEAD_DIM,
    text: Optional[str] = None,
) -> pathlib.Path:
    """Write (or reuse) a tiny GGUF model and return its path.

    ``arch``: ``"qwen35"`` (gated-delta-net layers alternating with gated full
    attention, one appended MTP block) or ``"glm4moe"`` (attention-only, one leading
    dense layer then tiny MoE layers with a shared expert, one appended MoE MTP block).
    ``mtp=False`` omits the MTP block and the ``nextn_predict_layers`` key.

    ``n_mtp`` (with ``mtp=True``) appends that many MTP blocks, ``blk.{n_layer}`` ..
    ``blk.{n_layer + n_mtp - 1}`` (``nextn_predict_layers = n_mtp``), each built like the
    single one (weak own attention / FFN, ``eh_proj`` passing the embedding half
    through), so head ``i`` of a chained draft predicts ``succ`` of its input token and
    a chain keeps following the rule. The pinned llama.cpp *loads* such a file for both
    arches (``llama_model_n_layer_nextn == n_mtp``) and the trunk runs normally, but
    both ``graph_mtp`` constructors ``GGML_ASSERT(n_layer_nextn == 1)``: creating an MTP
    context from an ``n_mtp > 1`` file aborts the process (see the module doc).

    ``acceptance`` (default 0.75 when ``eps`` is not given) picks ``eps`` from the
    measured :data:`EPS_TABLE`, scaled for ``n_embd`` / ``n_layer`` (see
    :func:`eps_for_acceptance`); ``eps`` sets the context-mixing scale directly (0 gives
    a trunk that follows the successor rule everywhere). Give one or the other.

    ``n_ff`` (default ``2 * n_embd``) is the dense FFN width; ``head_dim`` (16, 32, 64 or
    128; default 16) the attention head size, with the q/k norm gain adjusted to keep
    attention about as sharp. Both enter the file name only when not the default.

    ``text`` (words separated by spaces, each once) replaces the byte vocabulary's
    random successor permutation with :func:`text_vocab`: the rule recites ``text`` and
    every generated token is one of its words, so the output reads as text.

    ``n_embd`` must be a multiple of 32; ``ftype`` is ``"f32"`` or ``"f16"`` (norms, the
    conv kernel and the MoE router stay f32). The file lands in ``cache_dir`` (default
    ``$PYLLAMA_MTP_CACHE`` or ``~/.cache/pyllama_mtp/models``) under a name keyed by
    every parameter and :data:`GENERATOR_VERSION`; an existing file is reused.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    if acceptance is not None and eps is not None:
        raise ValueError("give acceptance or eps, not both")
    if n_embd < 32 or n_embd % 32:
        raise ValueError("n_embd must be a positive multiple of 32")
    if n_layer < 2:
        raise ValueError("n_layer must be >= 2")
    if eps is None:
        eps = eps_for_acceptance(arch, _DEFAULT_ACCEPTANCE if acceptance is None else acceptance,
                                 n_embd=n_embd, n_layer=n_layer)
    eps = float(eps)
    if eps < 0:
        raise ValueError("eps must be >= 0")
    if ftype not in ("f32", "f16"):
        raise ValueError("ftype must be 'f32' or 'f16'")
    n_mtp = int(n_mtp)
    if n_mtp < 1:
        raise ValueError("n_mtp must be >= 1 (use mtp=False for no MTP block)")
    if not mtp and n_mtp != 1:
        raise ValueError("n_mtp applies only with mtp=True")
    n_ff = 2 * n_embd if n_ff is None else int(n_ff)
    if n_ff < 32 or n_ff % 32:
        raise ValueError("n_ff must be a positive multiple of 32")
    head_dim = int(head_dim)
    if head_dim not in (16, 32, 64, 128) or n_embd % head_dim:
        raise ValueError("head_dim must be 16, 32, 64 or 128 and divide n_embd")

    params = dict(arch=arch, mtp=bool(mtp), eps=round(eps, 6), n_embd=n_embd, n_layer=n_layer,
                  seed=int(seed), ftype=ftype, v=GENERATOR_VERSION)
    tag = ""
    if n_mtp != 1:  # absent at their defaults: those files keep their names and bytes
        params["n_mtp"] = n_mtp
        tag = f"-m{n_mtp}"
    if n_ff != 2 * n_embd:
        params["n_ff"] = n_ff
        tag += f"-f{n_ff}"
    if head_dim != _HEAD_DIM:
        params["head_dim"] = head_dim
        tag += f"-h{head_dim}"
    vocab = _byte_vocab() if text is None else text_vocab(text)
    if text is not None:
        params["text"] = text
        tag += "-text"
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = (f"{arch}-{'mtp' if mtp else 'nomtp'}{tag}-eps{eps:g}-e{n_embd}-l{n_layer}-s{seed}-{ftype}"
            f"-g{GENERATOR_VERSION}-{digest}.gguf")
    directory = _cache_dir(cache_dir)
    path = directory / name
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)

    w = _W(seed, ftype)
    kv, succ = _BUILDERS[arch](w, n_embd, n_layer, n_mtp if mtp else 0, eps, vocab, n_ff, head_dim)

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=directory)
    os.close(fd)
    try:
        _write_gguf(tmp, arch, kv, w.tensors, vocab, succ, params, ftype)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


#: The demo model's shape (see "Demo model" in the module doc): ~134 M parameters, f32.
DEMO_CONFIG = dict(arch="qwen35", n_embd=1024, n_layer=12, head_dim=64, ftype="f32", seed=0)

#: Measured eps -> rule agreement for :data:`DEMO_CONFIG` (seed 0) with the byte
#: vocabulary, ascending eps (the benchmarks' larger model starts from it).
DEMO_EPS_TABLE: List[Tuple[float, float]] = [
    (3.0, 0.997), (3.5, 0.99), (4.0, 0.917), (4.5, 0.845), (5.0, 0.748), (5.5, 0.667), (6.0, 0.583),
    (7.0, 0.39), (8.0, 0.283),
]

#: What the demo model recites (:func:`text_vocab`): every word once.
DEMO_TEXT = (
    "The quick brown fox jumps over a lazy dog. A small draft head guesses several tokens ahead; "
    "one batched pass of the main model checks them at once. Accepted words cost almost nothing, "
    "rejected ones are rolled back, and output stays identical, only faster."
)

#: Measured eps -> rule agreement for :data:`DEMO_CONFIG` with :data:`DEMO_TEXT`
#: (seed 0; :func:`measure_rule_agreement`, 3 prompts x 150 tokens), ascending eps.
DEMO_TEXT_EPS_TABLE: List[Tuple[float, float]] = [
    (3.0, 1.0), (4.0, 0.982), (4.5, 0.938), (5.0, 0.871), (5.5, 0.835), (6.0, 0.766), (7.0, 0.661),
    (8.0, 0.504),
]

_DEMO_ACCEPTANCE = 0.9


def make_demo_model(cache_dir: Optional[Union[str, os.PathLike]] = None, *,
                    acceptance: float = _DEMO_ACCEPTANCE) -> pathlib.Path:
    """Write (or reuse) the demo model and return its path.

    A qwen35 fixture big enough for MTP to beat plain decoding on a small CPU
    (:data:`DEMO_CONFIG`: n_embd 1024, 12 trunk layers, head dim 64, f32, one MTP block;
    ~134 M parameters, a ~536 MB file written in a few seconds) whose vocabulary and
    rule recite :data:`DEMO_TEXT`, so what it writes is readable. ``acceptance`` picks
    ``eps`` from :data:`DEMO_TEXT_EPS_TABLE`, measured at this size. Cached like
    :func:`make_model`.
    """
    if not 0.0 < acceptance <= 1.0:
        raise ValueError("acceptance must be in (0, 1]")
    eps = round(_interp_eps(DEMO_TEXT_EPS_TABLE, acceptance, "the demo model"), 4)
    return make_model(eps=eps, cache_dir=cache_dir, text=DEMO_TEXT, **DEMO_CONFIG)


def _write_gguf(path, arch, kv, tensors, vocab: _Vocab, succ, params, ftype) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"pyllama_mtp fixture {arch}")
    writer.add_file_type(1 if ftype == "f16" else 0)
    for key, (kind, value) in kv.items():
        full = f"{arch}.{key}"
        if kind == "u32":
            writer.add_uint32(full, int(value))
        elif kind == "f32":
            writer.add_float32(full, float(value))
        elif kind == "bool":
            writer.add_bool(full, bool(value))
        elif kind == "i32[]":
            writer.add_array(full, [int(v) for v in value])
        else:  # pragma: no cover - internal table
            raise AssertionError(kind)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    writer.add_add_bos_token(False)

    writer.add_array(SUCC_KEY, [int(s) for s in succ])
    writer.add_string(_INFO_KEY, json.dumps(params, sort_keys=True))

    for name, arr in tensors.items():
        writer.add_tensor(name, arr)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------
# Reading fixture metadata back
# ---------------------------------------------------------------------------


def _read_field(path, key):
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field(key)
    if field is None:
        raise KeyError(f"{path} has no {key} (not a pyllama_mtp fixture?)")
    return field


# architectures whose llama.cpp graph_mtp asserts n_layer_nextn == 1 (pinned version)
_SINGLE_MTP_ARCHES = frozenset({"qwen35", "glm4moe"})


def _architecture(path) -> str:
    field = _read_field(path, "general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def successor_map(path: Union[str, os.PathLike]) -> np.ndarray:
    """``succ`` of a fixture: ``succ[t]`` is the rule's next token after ordinary token ``t``
    (``-1`` where a text vocabulary's rule says nothing, see :func:`text_vocab`)."""
    field = _read_field(path, SUCC_KEY)
    return np.array([int(field.parts[i][0]) for i in field.data], dtype=np.int64)


def fixture_info(path: Union[str, os.PathLike]) -> dict:
    """The generator parameters stored in a fixture (arch, mtp, eps, n_embd, ...)."""
    field = _read_field(path, _INFO_KEY)
    return json.loads(bytes(field.parts[field.data[0]]).decode())


# ---------------------------------------------------------------------------
# Measurement with plain llama.cpp calls
# ---------------------------------------------------------------------------

_DEFAULT_PROMPTS = ("The quick brown fox", "hello world, ", "In the beginning")


class _Runner:
    """Minimal owner of one model and its contexts (plain llama.h calls)."""

    def __init__(self, path, *, load_mtp: bool = True, n_threads: int = 1):
        # load_mtp: loading the MTP block (when present) costs little and avoids
        # llama.cpp's "unused tensor" warnings; the trunk graph ignores it.
        from ._ffi import ffi, lib

        self.ffi, self.lib = ffi, lib
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.load_mtp = load_mtp
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp failed to load {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_threads = n_threads
        self.contexts = []

    def context(self, n_ctx: int = 512, *, mtp: bool = False):
        cp = self.lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        if mtp:
            cp.ctx_type = self.lib.LLAMA_CONTEXT_TYPE_MTP
        ctx = self.lib.llama_init_from_model(self.model, cp)
        if ctx == self.ffi.NULL:
            raise RuntimeError("llama.cpp failed to create a context")
        self.contexts.append(ctx)
        return ctx

    def tokenize(self, text: Union[str, bytes]) -> List[int]:
        data = text.encode() if isinstance(text, str) else bytes(text)
        cap = len(data) + 8
        buf = self.ffi.new("llama_token[]", cap)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        if n < 0:
            raise RuntimeError("tokenize failed")
        return list(buf[0:n])

    def piece(self, token: int) -> bytes:
        buf = self.ffi.new("char[]", 64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        return self.ffi.buffer(buf, n)[:]

    def decode(self, ctx, tokens: Sequence[int], pos0: int, *, embd=None, last_only: bool = True) -> None:
        ffi = self.ffi
        n = len(tokens)
        tok = ffi.new("llama_token[]", list(tokens))
        pos = ffi.new("llama_pos[]", list(range(pos0, pos0 + n)))
        nseq = ffi.new("int32_t[]", [1] * n)
        seq0 = ffi.new("llama_seq_id[]", [0])
        seqs = ffi.new("llama_seq_id *[]", [seq0] * n)
        logits = ffi.new("int8_t[]", [1 if (i == n - 1 or not last_only) else 0 for i in range(n)])
        batch = ffi.new("llama_batch *")
        batch.n_tokens = n
        batch.token = tok
        batch.pos = pos
        batch.n_seq_id = nseq
        batch.seq_id = seqs
        batch.logits = logits
        keep = None
        if embd is not None:
            keep = ffi.new("float[]", np.ascontiguousarray(embd, dtype=np.float32).ravel().tolist())
            batch.embd = keep
        rc = self.lib.llama_decode(ctx, batch[0])
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, ctx, i: int = -1) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(ctx, i)
        if ptr == self.ffi.NULL:
            raise RuntimeError("no logits")
        return np.frombuffer(self.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def close(self) -> None:
        for ctx in self.contexts:
            self.lib.llama_free(ctx)
        self.contexts = []
        if self.model is not None and self.model != self.ffi.NULL:
            self.lib.llama_model_free(self.model)
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _prompt_tokens(runner: _Runner, prompt: Union[str, bytes, Sequence[int]]) -> List[int]:
    if isinstance(prompt, (str, bytes)):
        return runner.tokenize(prompt)
    return [int(t) for t in prompt]


def greedy_generate(
    path: Union[str, os.PathLike],
    prompt: Union[str, bytes, Sequence[int]] = "The quick brown fox",
    n_tokens: int = 200,
    *,
    n_ctx: int = 512,
) -> List[int]:
    """Greedy continuation (token ids) decoded one token at a time with plain llama.cpp calls."""
    with _Runner(path) as r:
        toks = _prompt_tokens(r, prompt)
        ctx = r.context(max(n_ctx, len(toks) + n_tokens + 1))
        r.decode(ctx, toks, 0)
        out: List[int] = []
        pos = len(toks)
        for _ in range(n_tokens):
            nxt = int(np.argmax(r.logits(ctx)))
            out.append(nxt)
            r.decode(ctx, [nxt], pos)
            pos += 1
        return out


def measure_rule_agreement(
    path: Union[str, os.PathLike],
    n_tokens: int = 200,
    prompts: Optional[Sequence[Union[str, bytes, Sequence[int]]]] = None,
) -> float:
    """Fraction of greedy steps whose next token is ``succ(current token)``.

    Decodes ``n_tokens`` greedy tokens after each prompt (default: three short texts)
    and pools the steps. This approximates the MTP acceptance rate of the fixture.
    """
    succ = successor_map(path)
    prompts = list(_DEFAULT_PROMPTS if prompts is None else prompts)
    hits = total = 0
    with _Runner(path) as r:
        for prompt in prompts:
            toks = _prompt_tokens(r, prompt)
            ctx = r.context(max(512, len(toks) + n_tokens + 1))
            r.decode(ctx, toks, 0)
            cur = toks[-1]
            pos = len(toks)
            for _ in range(n_tokens):
                nxt = int(np.argmax(r.logits(ctx)))
                if cur < len(succ) and succ[cur] >= 0:
                    total += 1
                    hits += int(nxt == succ[cur])
                r.decode(ctx, [nxt], pos)
                cur = nxt
                pos += 1
            r.lib.llama_free(ctx)
            r.contexts.remove(ctx)
    return hits / max(total, 1)


def measure_mtp_agreement(
    path: Union[str, os.PathLike],
    n_tokens: int = 200,
    prompt: Union[str, bytes, Sequence[int]] = "The quick brown fox",
) -> float:
    """Fraction of steps where the model's own MTP head (an MTP context) drafts the
    token the trunk then produces greedily, i.e. a greedy one-token-draft acceptance rate.

    Uses the pyllama_mtp shim for the trunk's pre-head hidden states (``h_nextn``).
    """
    from ._ffi import ffi, lib

    with _Runner(path, load_mtp=True) as r:
        n_nextn = lib.llama_model_n_layer_nextn(r.model)
        if n_nextn < 1:
            raise ValueError(f"{path} has no MTP layers")
        if n_nextn > 1 and _architecture(path) in _SINGLE_MTP_ARCHES:
            # the pinned llama.cpp would abort the process creating the MTP context
            raise ValueError(f"{path} has {n_nextn} MTP blocks; llama.cpp runs only one for this arch")
        toks = _prompt_tokens(r, prompt)
        n_ctx = max(512, len(toks) + n_tokens + 2)
        tgt = r.context(n_ctx)
        dft = r.context(n_ctx, mtp=True)
        lib.pmtp_set_embeddings_nextn(tgt, True, False)
        lib.pmtp_set_embeddings_nextn(dft, True, True)
        n_embd = lib.llama_model_n_embd(r.model)

        def hidden() -> np.ndarray:
            ptr = lib.pmtp_get_embeddings_nextn_ith(tgt, 0)
            if ptr == ffi.NULL:
                raise RuntimeError("no nextn embeddings from the trunk context")
            return np.frombuffer(ffi.buffer(ptr, 4 * n_embd), dtype=np.float32).copy()

        # The draft for position p+1 comes from the MTP context decoding (x[p], pos p)
        # paired with the trunk hidden state of position p-1: the same entry the
        # catch-up pass of a speculative decoder would add, so nothing is rolled back.
        hs: List[np.ndarray] = []
        for p, t in enumerate(toks):
            r.decode(tgt, [t], p)
            hs.append(hidden())
            if p >= 1:
                r.decode(dft, [t], p, embd=hs[p - 1])
        seq = list(toks) + [int(np.argmax(r.logits(tgt)))]
        hits = total = 0
        for _ in range(n_tokens):
            p = len(seq) - 1
            r.decode(dft, [seq[p]], p, embd=hs[p - 1])
            draft = int(np.argmax(r.logits(dft)))
            r.decode(tgt, [seq[p]], p)
            hs.append(hidden())
            nxt = int(np.argmax(r.logits(tgt)))
            total += 1
            hits += int(draft == nxt)
            seq.append(nxt)
        return hits / max(total, 1)
