"""The GGUF formats (``gguf:q4_0`` ... ``gguf:q6_k``, ``gguf:bf16``, ``gguf:f16``): one llama.cpp file.

The checkpoint is a folder holding one ``<name>-<TYPE>.gguf`` file written with the ``gguf`` package's
``GGUFWriter``: architecture metadata (Llama, Qwen2, Qwen3, Gemma3 families), the tokenizer, and every
tensor under its llama.cpp name.  Linear layers carry the blocks the RTN stage or SignRound quantized
(``dtypes.gguf.GGUFWeight``); the token embedding and the output projection are quantized here by
llama.cpp's rules for the file type; norms stay float32.  The per-layer type choice for the ``_S/_M/_L``
mixtures is ``dtypes.gguf.types.tensor_type`` (llama.cpp's ``llama_tensor_get_type``); ``plan_types`` applies it
to a model's linear layers before quantization, so the quantized model in memory decodes exactly as the
file does.

Facts carried over from llama.cpp's converter: Llama-family q/k projections are stored with the rows of
each head permuted (ggml's rotary layout, ``permute_qk``); Gemma norms are stored as ``1 + w``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from . import ExportFormat, ExportJob, QuantizedLayer, register_format
from .writer import atomic_output_dir, float_state_dict
from ..dtypes import gguf as gq
from ..dtypes.gguf.family import gguf_file_type_of, gguf_scheme, gguf_type_of
from ..errors import FormatError
from ..schemes import FLOAT, QuantScheme
from ...log import logger

# transformers model_type -> llama.cpp architecture
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}
PERMUTE_QK = {"llama"}  # architectures whose rotary embedding is ggml's "normal" (interleaved) layout
GEMMA_NORM_PLUS_ONE = {"gemma3"}

def permute_qk(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from HF's rotate-half layout to ggml's interleaved one:
    inside each head, rows ``[0, d/2)`` and ``[d/2, d)`` are interleaved (``r0, r_{d/2}, r1, ...``)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# metadata


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _rope_theta(config: Any, default: float) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        if isinstance(params, Mapping):
            if "rope_theta" in params:
                theta = params["rope_theta"]
            elif isinstance(params.get("full_attention"), Mapping):
                theta = params["full_attention"].get("rope_theta")
    return float(theta if theta is not None else default)


def write_architecture(writer: Any, arch: str, config: Any) -> None:
    hidden = config.hidden_size
    n_head = config.num_attention_heads
    head_dim = _cfg(config, "head_dim", default=hidden // n_head)
    writer.add_context_length(int(_cfg(config, "max_position_embeddings", default=2048)))
    writer.add_embedding_length(int(hidden))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(_cfg(config, "num_key_value_heads", default=n_head)))
    writer.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps", default=1e-6)))
    writer.add_vocab_size(int(config.vocab_size))
    if arch == "gemma3":
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
        writer.add_rope_freq_base(_rope_theta(config, 1_000_000.0))
        writer.add_sliding_window(int(_cfg(config, "sliding_window", default=4096)))
    else:
        writer.add_rope_freq_base(_rope_theta(config, 10_000.0))
        writer.add_rope_dimension_count(int(head_dim))
        if getattr(config, "head_dim", None) is not None or head_dim != hidden // n_head:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))


_TOKEN_NORMAL, _TOKEN_UNUSED, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_BYTE = 1, 5, 3, 4, 6
_QWEN2_PATTERN = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_LLAMA3_PATTERN = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


def _pre_tokenizer_name(tj: Mapping[str, Any], arch: str) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex it splits text with before BPE)."""
    text = json.dumps(tj.get("pre_tokenizer"))  # the regex appears JSON-escaped in it
    if json.dumps(_LLAMA3_PATTERN)[1:-1] in text:
        return "llama-bpe"
    if json.dumps(_QWEN2_PATTERN)[1:-1] in text or arch in ("qwen2", "qwen3"):
        return "qwen2"
    pre = tj.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's split regex
    return "default"


def write_tokenizer(writer: Any, tokenizer: Any, arch: str, vocab_size: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FormatError(
            f"the GGUF writer needs a fast (tokenizers-based) tokenizer, got {type(tokenizer).__name__}; "
            "load the tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise FormatError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    reverse = {i: tok for tok, i in vocab.items()}
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(_TOKEN_CONTROL if added[tok].get("special") else _TOKEN_USER_DEFINED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
            tokens.append(tok)
            types.append(_TOKEN_BYTE)
        else:
            tokens.append(tok)
            types.append(_TOKEN_NORMAL)
        scores.append(-float(i))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_fallback:  # sentencepiece-style BPE (Gemma): llama.cpp's "llama" tokenizer with scores
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if merges:
            writer.add_token_merges(merges)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tj, arch))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            add(tid)
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if add_bos is None:
        add_bos = bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None else False
    writer.add_add_bos_token(bool(add_bos))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoround")
    except PackageNotFoundError:
        return "0+unknown"


class GGUFFormat(ExportFormat):
    """Base of the ``gguf:<file type>`` formats; one subclass per llama.cpp file type is registered."""

    name = "gguf"
    description = "llama.cpp GGUF file"
    ftype = "q4_0"
    model_free = False  # written from the loaded model (token embedding and output projection are quantized too)
    streams = True  # a streamed run's file: block layers from their stage files, the rest read from the source
    lm_head = True  # the output tensor takes the quantized lm_head's own type (else llama.cpp's rule for the file)

    @property
    def float_model_ok(self) -> bool:
        """A float file type: a model with no quantized layer is a valid export."""
        return self.ftype in ("bf16", "f16")

    def adapt_scheme(self, scheme: QuantScheme, switch: bool = True) -> QuantScheme:
        """The scheme this file type needs.  An integer or float scheme is replaced (with a warning) by the
        file type's GGUF scheme; a GGUF scheme of another file type is an error."""
        wanted = FLOAT if self.float_model_ok else gguf_scheme(self.ftype)
        if scheme == wanted:
            return scheme
        ft = gguf_file_type_of(scheme) or gguf_type_of(scheme)
        if ft is not None or not switch:
            raise FormatError(
                f"format {self.name} writes a {self.ftype.upper()} file but the scheme is {scheme.describe()}; "
                f"use --scheme {'BF16' if self.float_model_ok else 'GGUF:' + self.ftype.upper()} with this format, "
                f"or the format gguf:{ft} with this scheme"
                if ft is not None
                else f"format {self.name} cannot hold {scheme.describe()}; quantize with --scheme "
                f"{'BF16' if self.float_model_ok else 'GGUF:' + self.ftype.upper()}"
            )
        logger.warning("format %s: using scheme %s instead of %s", self.name, wanted.describe(), scheme.describe())
        return wanted

    # -- the ExportFormat protocol -------------------------------------------------------------------
    def weights_error(self, scheme: QuantScheme) -> str | None:
        if scheme.is_float:
            return None
        if gguf_type_of(scheme) is None:
            return (
                f"{self.name} stores llama.cpp block types, not {scheme.describe()}; use --scheme "
                f"GGUF:{self.ftype.upper()} (or another GGUF:* scheme)"
            )
        return None

    def shape_error(self, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        qtype = gguf_type_of(scheme)
        if qtype is None or scheme.is_float:
            return None
        if in_features % gq.GGML_TYPES[qtype].block_size:
            return f"{in_features} input features are not a multiple of the {qtype} block ({gq.GGML_TYPES[qtype].block_size})"
        return None

    def layer_tensors(self, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
        w = layer.weight
        if not isinstance(w, gq.GGUFWeight):
            raise FormatError(f"layer {layer.name} was not quantized to a GGUF type; use a GGUF:* scheme")
        return {"weight": w.data}

    def quantization_config(self, job: ExportJob) -> dict[str, Any]:
        types: dict[str, int] = {}
        for layer in job.layers.values():  # a layer streamed tuning staged has no weight left, its scheme says
            qt = layer.weight.qtype if isinstance(layer.weight, gq.GGUFWeight) else (gguf_type_of(layer.scheme) or "f16")
            types[qt] = types.get(qt, 0) + 1
        return {"format": self.name, "file_type": self.ftype, "tensor_types": types, "autoround_version": _version()}

    # -- writing -------------------------------------------------------------------------------------
    def float_type(self, job: ExportJob) -> str:
        if self.ftype in ("bf16", "f16"):
            return self.ftype
        return "f16"

    def save(self, job: ExportJob, output_dir: str) -> str:
        import gguf

        model = job.model
        config = model.config
        model_type = getattr(config, "model_type", None)
        arch = ARCHITECTURES.get(model_type)
        if arch is None:
            raise FormatError(
                f"GGUF export does not know the architecture {model_type!r}; supported model types: "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        n_layers = int(config.num_hidden_layers)
        n_head = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
        # the float tensors: the model's, or read from the source files one at a time (streamed tuning), whose
        # skeleton still knows every shape; a block layer streamed tuning packed already comes from its stage file
        floats = job.float_tensors if job.float_tensors is not None else float_state_dict(model)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        staged = job.staged or {}
        tied = not any(k.startswith("lm_head.") for k in floats) or bool(getattr(config, "tie_word_embeddings", False))
        ftype = gq.GGUF_FILE_TYPES[self.ftype]

        def layer_data(name: str, layer: QuantizedLayer) -> torch.Tensor:
            packed = staged.get(name)
            return packed["weight"].load() if packed is not None else layer.weight.data

        def float_data(hf_name: str, module_name: str, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
            t = floats[hf_name].detach().to(torch.float32)
            if arch in GEMMA_NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
                t = t + 1
            if qtype == "f32":
                return t.contiguous().view(torch.uint8).reshape(-1)
            return gq.quantize_tensor(t, qtype)

        # (gguf name, type, shape, the tensor's bytes when asked): every tensor's type and size are known before
        # any is read, so the file is written one tensor at a time
        tensors: list[tuple[str, str, tuple[int, ...], Any]] = []
        counts: dict[str, int] = {}
        for hf_name in floats:
            module_name, _, suffix = hf_name.rpartition(".")
            gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                if "rotary_emb" in hf_name:
                    continue
                raise FormatError(f"no GGUF tensor name for {hf_name!r} in architecture {arch}")
            layer = job.layers.get(module_name) if suffix == "weight" else None
            if layer is not None:
                qtype = gguf_type_of(layer.scheme)
                if qtype is None or layer.scheme.is_float:
                    raise FormatError(f"layer {module_name} was not quantized to a GGUF type; use a GGUF:* scheme")
                shape = (layer.out_features, layer.in_features)
                produce = lambda n=module_name, ly=layer: layer_data(n, ly)  # noqa: E731
            else:
                shape = shapes[hf_name]
                qtype = "f32" if len(shape) != 2 else self._other_type(module_name, shape, tied, job)
                produce = lambda h=hf_name, m=module_name, q=qtype, sh=shape: float_data(h, m, q, sh)  # noqa: E731
            if arch in PERMUTE_QK and len(shape) == 2 and module_name.endswith(("q_proj", "k_proj")):
                heads = n_head if module_name.endswith("q_proj") else n_kv
                produce = lambda f=produce, h=heads: permute_qk(f(), h)  # noqa: E731
            tensors.append((gname, qtype, shape, produce))
            counts[qtype] = counts.get(qtype, 0) + 1

        folder_name = Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
        with atomic_output_dir(output_dir) as tmp:
            path = tmp / f"{folder_name}-{self.ftype.upper()}.gguf"
            writer = gguf.GGUFWriter(str(path), arch)
            writer.add_name(folder_name)
            write_architecture(writer, arch, config)
            writer.add_file_type(ftype.ftype_id)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if job.tokenizer is not None:
                write_tokenizer(writer, job.tokenizer, arch, int(config.vocab_size))
            else:
                logger.warning("no tokenizer given: the GGUF file has no tokenizer and llama.cpp will not load it")
            for gname, qtype, shape, _ in tensors:
                nbytes = _nbytes(shape, qtype)
                if qtype == "f32":
                    writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes)
                else:
                    gtype = gguf.GGMLQuantizationType(gq.GGML_TYPES[qtype].ggml_id)
                    writer.add_tensor_info(gname, _byte_shape(shape, qtype), np.dtype(np.uint8), nbytes,
                                           raw_dtype=gtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for gname, qtype, shape, produce in tensors:  # in the order of their infos, one in memory at a time
                data = produce().contiguous().numpy()
                if data.nbytes != _nbytes(shape, qtype):
                    raise FormatError(f"GGUF tensor {gname}: {data.nbytes} bytes where {qtype} {shape} takes "
                                      f"{_nbytes(shape, qtype)}")
                writer.write_tensor_data(data.view(np.float32).reshape(shape) if qtype == "f32" else data)
            writer.close()
        logger.info(
            "GGUF %s written to %s (%s)", self.ftype.upper(), output_dir,
            ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        )
        return str(Path(output_dir).absolute())

    def _other_type(self, module_name: str, shape: tuple[int, ...], tied: bool, job: ExportJob) -> str:
        """Type of a 2-D tensor that was not quantized (embedding, lm_head, layers kept float)."""
        if self.ftype in ("bf16", "f16"):
            return self.ftype
        if module_name.endswith("embed_tokens"):
            return gq.tensor_type(self.ftype, "token_embd", shape[1], tied_output=tied)
        if module_name == "lm_head" or module_name.endswith(".lm_head"):
            return gq.tensor_type(self.ftype, "output", shape[1])
        return self.float_type(job)  # a linear layer deliberately kept in float


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a ``shape`` tensor of ``qtype`` (rows of whole blocks)."""
    t = gq.GGML_TYPES[qtype]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // t.block_size) * t.type_size


def _byte_shape(shape: tuple[int, ...], qtype: str) -> tuple[int, ...]:
    """The logical tensor shape in ggml order (innermost first) is derived by the writer from bytes."""
    t = gq.GGML_TYPES[qtype]
    return tuple(shape[:-1]) + (shape[-1] // t.block_size * t.type_size,)


def _register_all() -> None:
    for ft in gq.GGUF_FILE_TYPES:
        cls = type(
            f"GGUF_{ft.upper()}_Format",
            (GGUFFormat,),
            {
                "name": f"gguf:{ft}",
                "description": f"llama.cpp GGUF file, {ft.upper()} (llama.cpp, transformers gguf_file=)",
                "ftype": ft,
            },
        )
        register_format(cls)


_register_all()
