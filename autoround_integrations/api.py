"""The user's entry point: ``AutoRound(model, scheme=..., ...).quantize_and_save(output_dir, format=...)``.

Parameter names and defaults follow the reference tool so its documented snippets work unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from pathlib import Path
from typing import Any

import torch

from autoround.quantizer.blockwise import peak_rss_gib
from autoround.quantizer.data import calibration_batch
from autoround.quantizer.errors import AutoRoundError, FormatError
from autoround.quantizer.formats import QuantizedLayer, parse_formats
from autoround.quantizer.formats import export as export_checkpoint
from autoround.quantizer.importance import model_importance
from autoround.quantizer.formats.writer import check_output_dir
from autoround.quantizer.options import build_options, check_unsupported
from autoround.quantizer.plan import LayerPlan, plan_layers
from autoround.quantizer.quantize import quantize_layers
from autoround.quantizer.model_io import (
    check_safetensors,
    conv1d_to_linear,
    find_block_names,
    linear_to_conv1d,
    load_model,
    load_tokenizer,
    quantizable_linears,
)
from autoround.quantizer.dtypes import family_of
from autoround.quantizer.schemes import resolve_scheme

from . import envs
from .log import logger

# set by _load(); until then (a folder whose plain RTN may take the model-free route) they load the model on use
_LAZY_ATTRS = ("model", "tokenizer", "block_names", "conv1d_names", "linears", "lm_head_name", "lm_head_tied")


class AutoRound:
    """Quantize a causal language model's linear layers to low-bit integers and export a checkpoint."""

    def __init__(self, model: Any, tokenizer: Any = None, **options: Any) -> None:
        """``model``: a local folder, a hub id, a .gguf file or a loaded model; ``tokenizer``: optional.

        Every other keyword is an option of ``quantizer/options.py`` (the reference tool's names and defaults,
        e.g. ``scheme``, ``bits``, ``group_size``, ``sym``, ``iters``, ``lr``, ``nsamples``, ``seqlen``,
        ``batch_size``, ``dataset``, ``device_map``, ``seed``, ``disable_opt_rtn``); an unknown keyword is a
        ``TypeError`` listing the valid ones, a bad value an ``AutoRoundError`` before any work."""
        try:
            plan, calib, tuning, runtime = build_options(options)
            check_unsupported(plan, tuning)
            envs.check_unsupported()
        except ValueError as exc:
            raise AutoRoundError(str(exc)) from None
        self.plan_options, self.calibration_options = plan, calib
        self.tuning_options, self.runtime_options = tuning, runtime
        self.scheme = resolve_scheme(plan.scheme, bits=plan.bits, group_size=plan.group_size, sym=plan.sym,
                                     act_bits=plan.act_bits)
        self.layer_config = dict(plan.layer_config or {})
        self.ignore_layers = _name_list(plan.ignore_layers)
        self.device_map = runtime.device_map
        self.resume_dir: str | None = None  # set by quantize_and_save(resume=...)
        self.resume = False
        self._resume_store = None
        self.layers: dict[str, QuantizedLayer] = {}
        self.plan: LayerPlan | None = None
        self.quantized = False
        self._model_src = model
        # plain RTN of a local folder may never need the model (quantize_and_save streams the weights): its
        # load waits until something asks for it (ar.model, quantize(), a format that needs it)
        self._deferred_folder = self._model_free_folder(model)
        if tokenizer is not None or self._deferred_folder is None:
            self.tokenizer = tokenizer
        if self._deferred_folder is None:
            self._load()

    def _model_free_folder(self, model: Any) -> str | None:
        """The folder whose load may be deferred (plain RTN of a local folder), after checking its files."""
        if self._model_free_reason(model) is not None:
            return None
        path = Path(str(model)).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            return None  # the normal load reports what is wrong
        check_safetensors(path)  # a corrupt file fails now, as it does when the model is loaded here
        return str(path)

    def _model_free_reason(self, model: Any, fmts: list | None = None) -> str | None:
        """Why the model-free route cannot write this run's checkpoint, or None when it can."""
        if self.runtime_options.disable_model_free:
            return "disable_model_free=True"
        if self.tuning_options.iters > 0:
            return "SignRound (iters > 0) runs the model"
        if not self.tuning_options.disable_opt_rtn:
            return "optimized RTN runs the model on calibration data (disable_opt_rtn=True does not)"
        if not isinstance(model, (str, os.PathLike)):
            return "the model was passed already loaded"
        path = Path(str(model)).expanduser()
        if path.suffix.lower() == ".gguf":
            return "the model is a GGUF file"
        if not path.is_dir():
            return "the model is not a local folder"
        if self.plan_options.quant_lm_head:
            return "quant_lm_head is set"
        if self.device_map not in (None, "cpu"):
            return f"device_map={self.device_map!r} places the model"
        for fmt in fmts or []:
            if not fmt.model_free:
                return f"format {fmt.name!r} is written from the loaded model"
        if fmts is not None and (self.scheme.is_float or not family_of(self.scheme).model_free):
            return f"scheme {self.scheme.describe()} is not plain integer RTN"
        return None

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set yet: those of a model whose load was deferred
        if name in _LAZY_ATTRS and self.__dict__.get("_deferred_folder") is not None:
            if name == "tokenizer":  # the tokenizer alone does not need the model
                self.tokenizer = load_tokenizer(self._deferred_folder)
            else:
                logger.info("loading the model from %s", self._deferred_folder)
                self._load()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _block_names_option(self) -> list[str] | None:
        blocks = self.plan_options.to_quant_block_names
        return _name_list(blocks) if blocks else None

    def _load(self) -> None:
        """Load the model and find what to quantize in it."""
        self.model, self.tokenizer = load_model(
            self._model_src, self.__dict__.get("tokenizer"), device_map=self.device_map
        )
        self._deferred_folder = None
        self.model.eval()
        self.block_names = self._block_names_option() or find_block_names(self.model)
        # GPT-2-style Conv1D layers become nn.Linear while quantizing, and are restored afterwards
        self.conv1d_names = conv1d_to_linear(self.model, self.block_names)
        self.linears = quantizable_linears(self.model, self.block_names)
        quant_head = self.plan_options.quant_lm_head
        self.lm_head_name, self.lm_head_tied = self._find_lm_head() if quant_head else (None, False)
        if self.lm_head_name is not None:
            self.linears[self.lm_head_name] = self.model.get_submodule(self.lm_head_name)

    # -- quantization -------------------------------------------------------------------------------
    def _find_lm_head(self) -> tuple[str | None, bool]:
        """(name, tied to the input embedding) of the output projection to quantize."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear):
            raise AutoRoundError("quant_lm_head: this model has no linear output projection (lm_head) to quantize")
        name = next(n for n, m in self.model.named_modules() if m is head)
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        tied = emb is not None and getattr(emb, "weight", None) is head.weight
        return name, tied

    def _plan(self, formats: list) -> LayerPlan:
        return plan_layers(
            self.linears, self.scheme, self.layer_config, formats, self.ignore_layers,
            lm_head=self.lm_head_name, lm_head_tied=self.lm_head_tied,
        )

    def _untie_lm_head(self) -> None:
        """Give a tied lm_head its own weight before it is quantized (the embedding stays float)."""
        if self.lm_head_name is None or not self.lm_head_tied or self.lm_head_name not in self.plan.quantize:
            return
        head = self.model.get_submodule(self.lm_head_name)
        if head.weight is not self.model.get_input_embeddings().weight:
            return  # already untied by an earlier quantize()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.model.config.tie_word_embeddings = False
        logger.info("untied %s from the input embedding to quantize it", self.lm_head_name)

    def quantize(self, formats: "str | list | None" = None) -> tuple[Any, dict[str, Any]]:
        """Quantize in memory (weights become their fake-quantized values); returns (model, layer_config)."""
        fmts = parse_formats(formats or "auto_round")
        self._adapt_scheme(fmts)
        if self.scheme.is_float and all(f.float_model_ok for f in fmts):
            # e.g. gguf:bf16: a float file, nothing to quantize
            self.plan = LayerPlan(keep_float=list(self.linears))
            self.layers = {}
            self._finish()
            return self.model, self._layer_config()
        self.plan = self._plan(fmts)
        self._untie_lm_head()
        torch.manual_seed(self.tuning_options.seed)
        if self.runtime_options.enable_deterministic_algorithms:
            torch.use_deterministic_algorithms(True, warn_only=False)
        start = time.time()
        if self.tuning_options.iters > 0:
            self._signround()
            self._quantize_outside_blocks()
            self._finish()
            return self.model, self._layer_config()
        if self.resume:
            logger.info("--resume has nothing to resume with iters 0 (round-to-nearest runs in one pass)")
        importance = None
        if not self.tuning_options.disable_opt_rtn:
            calib = self._calibration()
            logger.info("collecting activation statistics on %d x %d calibration tokens", *calib.shape)
            importance = model_importance(
                self.model, {n: self.linears[n] for n in self.plan.quantize if n != self.lm_head_name}, calib,
                self.tuning_options.batch_size,
            )
        self.layers = quantize_layers(
            self.linears, self.plan, importance, envs.AR_SEARCH_SCALE_RATIO
        )
        self._finish()
        logger.info(
            "%s done in %.1fs: %d layers quantized (%s), %d kept in float",
            "RTN" if self.tuning_options.disable_opt_rtn else "optimized RTN",
            time.time() - start,
            len(self.layers),
            self.scheme.describe(),
            len(self.plan.keep_float),
        )
        return self.model, self._layer_config()

    def _finish(self) -> None:
        linear_to_conv1d(self.model, self.conv1d_names)
        self.conv1d_names = []
        self.quantized = True

    def _quantize_outside_blocks(self) -> None:
        """SignRound tunes the blocks; planned layers outside them (lm_head) are rounded to nearest."""
        rest = [n for n in self.plan.quantize if n not in self.layers]
        if rest:
            sub = LayerPlan(quantize={n: self.plan.quantize[n] for n in rest})
            self.layers.update(quantize_layers(self.linears, sub, None, envs.AR_SEARCH_SCALE_RATIO))

    def _adapt_scheme(self, fmts: list) -> None:
        """Formats that fix the scheme (gguf:q4_k_m needs GGUF:Q4_K_M) adapt it before any work."""
        for fmt in fmts:
            self.scheme = fmt.adapt_scheme(self.scheme)

    def _layer_config(self) -> dict[str, Any]:
        layer_config: dict[str, Any] = {n: layer.scheme.to_dict() for n, layer in self.layers.items()}
        layer_config.update({n: {"bits": 16} for n in self.plan.keep_float})
        return layer_config

    def _signround(self) -> None:
        from autoround.quantizer.blockwise import signround_blocks
        from autoround.quantizer.data import loss_mask
        from autoround.quantizer.model_io import final_norm
        from autoround.quantizer.resume import ResumeStore, model_digest, resume_dir_for, tensor_digest
        from autoround.quantizer.signround import SignRoundOptions

        try:
            options = SignRoundOptions(**dataclasses.asdict(self.tuning_options))
        except ValueError as exc:
            raise AutoRoundError(str(exc)) from None
        calib = self._calibration()
        mask = loss_mask(calib, getattr(self.tokenizer, "pad_token_id", None))
        blocks = [
            (f"{list_name}.{i}", block)
            for list_name in self.block_names
            for i, block in enumerate(self.model.get_submodule(list_name))
        ]
        store = None
        if self.resume_dir is not None:
            fingerprint = {
                "model": model_digest(self.model),
                "calibration": tensor_digest(calib),
                "schemes": {n: s.to_dict() for n, s in self.plan.quantize.items()},
                # every tuning option but the one that only concerns iters 0
                "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "disable_opt_rtn"},
            }
            store = ResumeStore.open(resume_dir_for(self.resume_dir), fingerprint, self.resume, logger)
        lm_head = None
        if self.lm_head_name is not None:
            lm_head = (self.lm_head_name, final_norm(self.model), self.linears[self.lm_head_name])
        cache_device = "cpu" if self.runtime_options.low_gpu_mem_usage else None
        start = time.time()
        self.layers = signround_blocks(
            self.model, blocks, self.plan.quantize, calib, options, options.enable_quanted_input,
            loss_mask=mask, resume=store, cache_device=cache_device,
            compile_forward=self.runtime_options.enable_torch_compile,
            lm_head=lm_head,
        )
        self._resume_store = store
        logger.info(
            "SignRound done in %.1fs: %d layers quantized (%s, iters %d), %d kept in float",
            time.time() - start, len(self.layers), self.scheme.describe(), options.iters, len(self.plan.keep_float),
        )

    def _calibration(self) -> torch.Tensor:
        c = self.calibration_options
        return calibration_batch(c.dataset, self.tokenizer, c.nsamples, c.seqlen, self.tuning_options.seed)

    def _settings(self) -> dict[str, Any]:
        """The run's settings recorded in the checkpoint's quantization config."""
        t, c = self.tuning_options, self.calibration_options
        settings: dict[str, Any] = {"iters": t.iters}
        if t.iters > 0:
            settings["lr"] = t.learning_rate
        if t.iters == 0:
            settings["disable_opt_rtn"] = t.disable_opt_rtn
        if t.iters > 0 or not t.disable_opt_rtn:
            settings.update(nsamples=c.nsamples, seqlen=c.seqlen)
            if isinstance(c.dataset, str):
                settings["dataset"] = c.dataset
        return settings

    def save_quantized(self, output_dir: str | os.PathLike, format: str = "auto_round", inplace: bool = True) -> list[str]:
        """Write one checkpoint per format (comma-separated); with several formats, one subfolder each."""
        _check_inplace(inplace)
        fmts = parse_formats(format)
        check_output_dir(output_dir)
        if not self.quantized:
            raise AutoRoundError("call quantize() before save_quantized(), or use quantize_and_save()")
        for fmt in fmts:  # formats chosen after quantize() must still hold the schemes and shapes used
            fmt.adapt_scheme(self.scheme, switch=False)
            if self.plan is not None and not self.plan.quantize and fmt.float_model_ok:
                continue
            packable = self._plan([fmt]).quantize
            lost = [n for n in self.layers if n not in packable]
            if lost:
                raise FormatError(
                    f"format {fmt.name!r} cannot pack {len(lost)} layer(s) that were quantized for other formats "
                    f"(e.g. {lost[0]}: see the warning above); pass every format to quantize() or "
                    "quantize_and_save(format='a,b') so those layers are planned before quantization"
                )
        paths = []
        for fmt in fmts:
            out = str(output_dir) if len(fmts) == 1 else os.path.join(str(output_dir), fmt.name)
            paths.append(
                export_checkpoint(
                    fmt, self.model, self.layers, self.plan, self.scheme, self.block_names, out, self.tokenizer,
                    self._settings(),
                )
            )
        return paths

    def quantize_and_save(
        self,
        output_dir: str | os.PathLike = "tmp_autoround",
        format: str = "auto_round",
        inplace: bool = True,
        resume: bool = False,
    ) -> tuple[Any, list[str]]:
        """Check the output folder and formats first, then quantize and save; returns (model, folders).

        SignRound runs (iters > 0) keep every finished block in a hidden sibling of ``output_dir``; after an
        interruption, the same call with ``resume=True`` continues from the last finished block and writes the
        same checkpoint an uninterrupted run would.  The state is removed once the checkpoint is saved.

        Plain RTN (``iters=0, disable_opt_rtn=True``) of a local model folder takes the model-free route when
        the format allows it (auto_round, auto_gptq, auto_awq, llm_compressor): the weights are streamed from
        the folder tensor by tensor and the model is never loaded, so the returned model is None (``ar.model``
        loads the float model).  The checkpoint is the same as the in-memory route's; ``disable_model_free=True``
        forces the in-memory route."""
        _check_inplace(inplace)
        check_output_dir(output_dir)
        start = time.time()
        fmts = parse_formats(format)
        if self.__dict__.get("_deferred_folder") is not None:
            reason = self._model_free_reason(self._model_src, fmts)
            if reason is None:
                paths = self._save_model_free(output_dir, fmts)
                if paths is not None:
                    logger.info(
                        "quantize_and_save finished in %.1fs; peak RSS %.2f GiB", time.time() - start, peak_rss_gib()
                    )
                    return None, paths
            else:
                logger.info("in-memory route: loading the model (%s)", reason)
        else:
            reason = self._model_free_reason(self._model_src) or "the model is already loaded"
            logger.info("in-memory route (%s)", reason)
        self.resume_dir, self.resume = str(output_dir), resume
        self._resume_store = None
        self.quantize(format)
        paths = self.save_quantized(output_dir, format)
        if self._resume_store is not None:
            self._resume_store.discard()
        logger.info("quantize_and_save finished in %.1fs; peak RSS %.2f GiB", time.time() - start, peak_rss_gib())
        return self.model, paths

    def _save_model_free(self, output_dir: str | os.PathLike, fmts: list) -> list[str] | None:
        """Plain RTN streamed from the model folder (``quantizer/model_free.py``), or None when that route
        declines this model (the caller then loads it)."""
        from autoround.quantizer import model_free

        folder = self._deferred_folder
        try:
            src = model_free.open_model(folder, self._block_names_option())
        except model_free.Declined as exc:
            logger.info("in-memory route: loading the model (the model-free route cannot reproduce it: %s)", exc)
            return None
        logger.info(
            "model-free route: plain RTN streamed tensor by tensor from %s without loading the model "
            "(disable_model_free=True loads it instead)", folder,
        )
        self._adapt_scheme(fmts)
        plan = plan_layers(src.linears, self.scheme, self.layer_config, fmts, self.ignore_layers)
        # a tokenizer the user did not pass is loaded only when it is written, after the tensors, so it is not in
        # memory while they stream (about 80 MB for SmolLM2's)
        tokenizer = self.__dict__.get("tokenizer") or model_free.FolderTokenizer(folder)
        paths = []
        for fmt in fmts:
            out = str(output_dir) if len(fmts) == 1 else os.path.join(str(output_dir), fmt.name)
            paths.append(model_free.export(fmt, src, plan, self.scheme, out, tokenizer, self._settings()))
        self.plan = plan
        return paths


def _name_list(value: Any) -> list[str]:
    """A comma-separated string or a sequence of names as a list (empty names dropped)."""
    if isinstance(value, str):
        return [x for x in value.split(",") if x]
    return list(value or [])


def _flat_signature() -> inspect.Signature:
    """``AutoRound.__init__``'s signature as ``help()`` and IDEs show it: every option by name, with its default."""
    from autoround.quantizer.options import defaults

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kind), inspect.Parameter("model", kind),
              inspect.Parameter("tokenizer", kind, default=None)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=v) for n, v in defaults().items()]
    return inspect.Signature(params)


AutoRound.__init__.__signature__ = _flat_signature()  # type: ignore[attr-defined]


def _check_inplace(inplace: bool) -> None:
    if inplace is not True:
        raise AutoRoundError(
            f"inplace={inplace!r} is not supported: quantization replaces the model's weights by their quantized "
            "values in place; keep inplace=True and load a fresh copy of the model if you need the float one"
        )


class AutoScheme:
    """Mixed-bit automatic scheme search (per-layer bit allocation under an average-bits budget)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "AutoScheme (automatic mixed-bit search) is not yet supported by autoround; pass a fixed scheme such "
            "as scheme='W4A16' and per-layer overrides with layer_config={'name': {'bits': 8}}"
        )
