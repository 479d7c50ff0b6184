"""The ggml tensor types and llama.cpp file types, and llama.cpp's per-tensor type rules for the ``_S/_M/_L``
mixtures (``llama_tensor_get_type``).  Data and rules only: the block codecs live in ``legacy``, ``kquants`` and
``iq4_nl`` beside this module."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

QK_K = 256
GROUP_MAX_EPS = 1e-15


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in GGUF files, block geometry and the integer scheme it stands for."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int
    bits: int  # weight bits (16/32 for float types)
    group_size: int  # elements sharing one (sub-block) scale
    sym: bool

    @property
    def is_float(self) -> bool:
        return self.bits >= 16


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("f32", 0, 1, 4, 32, -1, True),
        GGMLType("f16", 1, 1, 2, 16, -1, True),
        GGMLType("bf16", 30, 1, 2, 16, -1, True),
        GGMLType("q4_0", 2, 32, 18, 4, 32, True),
        GGMLType("q4_1", 3, 32, 20, 4, 32, False),
        GGMLType("q5_0", 6, 32, 22, 5, 32, True),
        GGMLType("q5_1", 7, 32, 24, 5, 32, False),
        GGMLType("q8_0", 8, 32, 34, 8, 32, True),
        GGMLType("q2_k", 10, QK_K, 84, 2, 16, False),
        GGMLType("q3_k", 11, QK_K, 110, 3, 16, True),
        GGMLType("q4_k", 12, QK_K, 144, 4, 32, False),
        GGMLType("q5_k", 13, QK_K, 176, 5, 32, False),
        GGMLType("q6_k", 14, QK_K, 210, 6, 16, True),
        GGMLType("iq4_nl", 20, 32, 18, 4, 32, True),
    )
}
QUANT_TYPES = tuple(n for n, t in GGML_TYPES.items() if not t.is_float)


@dataclass(frozen=True)
class GGUFFileType:
    """A llama.cpp file type (``general.file_type``): the default tensor type plus per-tensor rules."""

    name: str
    ftype_id: int  # llama_ftype
    default_type: str


GGUF_FILE_TYPES: dict[str, GGUFFileType] = {
    f.name: f
    for f in (
        GGUFFileType("f16", 1, "f16"),
        GGUFFileType("bf16", 32, "bf16"),
        GGUFFileType("q4_0", 2, "q4_0"),
        GGUFFileType("q4_1", 3, "q4_1"),
        GGUFFileType("q5_0", 8, "q5_0"),
        GGUFFileType("q5_1", 9, "q5_1"),
        GGUFFileType("q8_0", 7, "q8_0"),
        GGUFFileType("q2_k_s", 21, "q2_k"),
        GGUFFileType("q3_k_s", 11, "q3_k"),
        GGUFFileType("q3_k_m", 12, "q3_k"),
        GGUFFileType("q3_k_l", 13, "q3_k"),
        GGUFFileType("q4_k_s", 14, "q4_k"),
        GGUFFileType("q4_k_m", 15, "q4_k"),
        GGUFFileType("q5_k_s", 16, "q5_k"),
        GGUFFileType("q5_k_m", 17, "q5_k"),
        GGUFFileType("q6_k", 18, "q6_k"),
    )
}


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's per-tensor type choice (llama_tensor_get_type), for the file types above.
# category: "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd",
# "output" (the lm_head); other tensors are not quantized.


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp: the first and last eighth of the layers, and every third layer between, get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# k-quant types whose 256-wide super-block does not fit a row fall back as llama.cpp does
# (llama.cpp's tensor_type_fallback: q2_k/q3_k -> q4_0, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0)
_INCOMPATIBLE_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fit_row(qtype: str, row_len: int) -> str:
    """The type llama.cpp uses when ``qtype``'s block does not divide the row (then f16 as the last resort)."""
    if row_len % GGML_TYPES[qtype].block_size == 0:
        return qtype
    new = _INCOMPATIBLE_FALLBACK.get(qtype, "f16")
    return new if row_len % GGML_TYPES[new].block_size == 0 else "f16"


def tensor_type(
    ftype: str,
    category: str,
    row_len: int,
    i_layer: int = 0,
    n_layers: int = 1,
    n_gqa: int = 1,
    tied_output: bool = False,
) -> str:
    """The ggml type llama.cpp's ``llama_tensor_get_type`` picks for one tensor of a ``ftype`` file.

    ``i_layer``/``n_layers`` count the layers holding this category (attn_v and ffn_down use them);
    ``n_gqa`` = attention heads / kv heads; ``tied_output``: the model has no separate lm_head, so the
    token embedding also serves as the output projection and follows the output rules.
    """
    ft = GGUF_FILE_TYPES[ftype]
    new = ft.default_type
    if GGML_TYPES[new].is_float:
        return new
    if category == "output" or (category == "token_embd" and tied_output):
        if row_len % GGML_TYPES[new].block_size != 0:
            new = "q8_0"
        elif new != "q8_0":
            new = "q6_k"
    elif category == "attn_v":
        if ftype == "q2_k_s" and n_gqa >= 4:
            new = "q4_k"
        elif ftype == "q3_k_m":
            new = "q5_k" if i_layer < 2 else "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layers):
            new = "q6_k"
        elif ftype == "q4_k_s" and i_layer < 4:
            new = "q5_k"
    elif category == "ffn_down":
        if ftype == "q2_k_s":
            if i_layer < n_layers // 8:
                new = "q4_k"
        elif ftype == "q3_k_m":
            new = "q5_k" if i_layer < n_layers // 16 else "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layers):
            new = "q6_k"
        elif ftype == "q4_k_s" and i_layer < n_layers // 8:
            new = "q5_k"
    elif category == "attn_output":
        if ftype == "q3_k_m":
            new = "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
    return fit_row(new, row_len)


# -- the rules applied to a Hugging Face model's linear layers --

# HF linear-layer suffix -> llama.cpp tensor category (for the type rules)
CATEGORIES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def category_of(name: str) -> str:
    return CATEGORIES.get(name.rsplit(".", 1)[-1], "other")


def plan_types(
    shapes: Mapping[str, tuple[int, int]], ftype: str, n_gqa: int | None = None
) -> dict[str, str]:
    """llama.cpp's tensor type for every linear layer (name -> ``[out, in]``) of a ``ftype`` file."""
    if ftype not in GGUF_FILE_TYPES:
        ftype_default = ftype  # a plain block type used as the model default: no rules, only the row fit
        return {n: fit_row(ftype_default, shp[1]) for n, shp in shapes.items()}
    if n_gqa is None:
        q = [s[0] for n, s in shapes.items() if category_of(n) == "attn_q"]
        k = [s[0] for n, s in shapes.items() if category_of(n) == "attn_k"]
        n_gqa = max(1, q[0] // k[0]) if q and k and k[0] else 1
    counts: dict[str, int] = {}
    for n in shapes:
        counts[category_of(n)] = counts.get(category_of(n), 0) + 1
    seen: dict[str, int] = {}
    out = {}
    for name, (_, in_f) in shapes.items():
        cat = category_of(name)
        m = _LAYER_INDEX.search(name)
        i_layer = int(m.group(1)) if m else seen.get(cat, 0)
        seen[cat] = seen.get(cat, 0) + 1
        out[name] = tensor_type(ftype, cat, in_f, i_layer, counts[cat], n_gqa)
    return out
