"""The user's entry point: ``AutoRound(model, scheme=..., ...).quantize_and_save(output_dir, format=...)``.

Parameter names and defaults follow the reference tool so its documented snippets work unchanged.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import torch

from autoround.quantizer import compressor
from autoround.quantizer.data import DEFAULT_DATASET, calibration_batch
from autoround.quantizer.errors import AutoRoundError, SchemeError
from autoround.quantizer.formats import parse_formats
from autoround.quantizer.formats.writer import check_output_dir
from autoround.quantizer.model_io import find_block_names, load_model, quantizable_linears
from autoround.quantizer.schemes import QuantScheme, gguf_type_of, resolve_scheme

from . import envs
from .log import logger

# Options of the reference tool that only matter to SignRound tuning (iters > 0); accepted and recorded.
TUNING_OPTIONS = {
    "minmax_lr": None,
    "gradient_accumulate_steps": 1,
    "enable_minmax_tuning": True,
    "enable_quanted_input": True,
    "not_use_best_mse": False,
    "dynamic_max_gap": -1,
    "enable_adam": False,
    "enable_deterministic_algorithms": False,
    "quant_lm_head": False,
    "ignore_layers": "",
    "to_quant_block_names": None,
    "super_bits": None,
    "super_group_size": None,
    "act_bits": None,
    "nblocks": 1,
    "scale_dtype": "fp16",
}


class AutoRound:
    """Quantize a causal language model's linear layers to low-bit integers and export a checkpoint."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        scheme: "str | QuantScheme | Mapping[str, Any]" = "W4A16",
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        layer_config: Mapping[str, Any] | None = None,
        iters: int = 200,
        lr: float | None = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        batch_size: int = 8,
        dataset: Any = DEFAULT_DATASET,
        device_map: Any = None,
        seed: int = 42,
        disable_opt_rtn: bool = False,
        low_gpu_mem_usage: bool = False,
        enable_torch_compile: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(TUNING_OPTIONS))
        if unknown:
            valid = sorted(
                ["model", "tokenizer", "scheme", "bits", "group_size", "sym", "layer_config", "iters", "lr", "nsamples",
                 "seqlen", "batch_size", "dataset", "device_map", "seed", "disable_opt_rtn", "low_gpu_mem_usage",
                 "enable_torch_compile"] + list(TUNING_OPTIONS)
            )
            raise TypeError(f"AutoRound got unknown argument(s) {unknown}; valid arguments: {', '.join(valid)}")
        if not isinstance(iters, int) or iters < 0:
            raise AutoRoundError(f"iters must be a non-negative integer, got {iters!r}")
        for name, val in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
            if not isinstance(val, int) or val <= 0:
                raise AutoRoundError(f"{name} must be a positive integer, got {val!r}")
        self.scheme = resolve_scheme(scheme, bits=bits, group_size=group_size, sym=sym)
        self.layer_config = dict(layer_config or {})
        self.iters, self.lr = iters, lr
        self.nsamples, self.seqlen, self.batch_size = nsamples, seqlen, batch_size
        self.dataset, self.seed = dataset, seed
        self.disable_opt_rtn = disable_opt_rtn
        self.low_gpu_mem_usage, self.enable_torch_compile = low_gpu_mem_usage, enable_torch_compile
        self.options = {**TUNING_OPTIONS, **kwargs}
        self.device_map = device_map
        self.model, self.tokenizer = load_model(model, tokenizer, device_map=device_map)
        self.model.eval()
        blocks = self.options["to_quant_block_names"]
        self.block_names = (
            [b for b in blocks.split(",") if b] if isinstance(blocks, str) else list(blocks)
        ) if blocks else find_block_names(self.model)
        self.linears = quantizable_linears(self.model, self.block_names)
        ignore = self.options["ignore_layers"]
        self.ignore_layers = [x for x in ignore.split(",") if x] if isinstance(ignore, str) else list(ignore or [])
        self.layers: dict[str, compressor.QuantizedLayer] = {}
        self.plan: compressor.LayerPlan | None = None
        self.quantized = False

    # -- quantization -------------------------------------------------------------------------------
    def _plan(self, formats: list) -> compressor.LayerPlan:
        return compressor.plan_layers(self.linears, self.scheme, self.layer_config, formats, self.ignore_layers)

    def quantize(self, formats: "str | list | None" = None) -> tuple[Any, dict[str, Any]]:
        """Quantize in memory (weights become their fake-quantized values); returns (model, layer_config)."""
        fmts = parse_formats(formats or "auto_round")
        self._adapt_scheme(fmts)
        if self.scheme.is_float and all(getattr(f, "float_model_ok", False) for f in fmts):
            # e.g. gguf:bf16: a float file, nothing to quantize
            self.plan = compressor.LayerPlan(keep_float=list(self.linears))
            self.layers, self.quantized = {}, True
            return self.model, self._layer_config()
        self.plan = self._plan(fmts)
        torch.manual_seed(self.seed)
        start = time.time()
        if self.iters > 0:
            if any(gguf_type_of(s) is not None for s in self.plan.quantize.values()):
                raise SchemeError(
                    "SignRound tuning (iters > 0) of GGUF block types is not supported yet; use iters=0 "
                    "(--iters 0), which quantizes the GGUF types with llama.cpp's importance-weighted "
                    "scale search, or an integer scheme such as W4A16 with format auto_round"
                )
            self._signround()
            self.quantized = True
            return self.model, self._layer_config()
        importance = None
        if not self.disable_opt_rtn:
            calib = calibration_batch(self.dataset, self.tokenizer, self.nsamples, self.seqlen, self.seed)
            logger.info("collecting activation statistics on %d x %d calibration tokens", *calib.shape)
            importance = compressor.collect_importance(
                self.model, {n: self.linears[n] for n in self.plan.quantize}, calib, self.batch_size
            )
        self.layers = compressor.quantize_layers(
            self.linears, self.plan, importance, envs.AR_SEARCH_SCALE_RATIO
        )
        self.quantized = True
        logger.info(
            "%s done in %.1fs: %d layers quantized (%s), %d kept in float",
            "RTN" if self.disable_opt_rtn else "optimized RTN",
            time.time() - start,
            len(self.layers),
            self.scheme.describe(),
            len(self.plan.keep_float),
        )
        return self.model, self._layer_config()

    def _adapt_scheme(self, fmts: list) -> None:
        """Formats that fix the scheme (gguf:q4_k_m needs GGUF:Q4_K_M) adapt it before any work."""
        for fmt in fmts:
            adapt = getattr(fmt, "adapt_scheme", None)
            if adapt is not None:
                self.scheme = adapt(self.scheme)

    def _layer_config(self) -> dict[str, Any]:
        layer_config: dict[str, Any] = {n: layer.scheme.to_dict() for n, layer in self.layers.items()}
        layer_config.update({n: {"bits": 16} for n in self.plan.keep_float})
        return layer_config

    def _signround(self) -> None:
        from autoround.quantizer.blockwise import signround_blocks
        from autoround.quantizer.signround import SignRoundOptions

        if self.options["gradient_accumulate_steps"] != 1:
            logger.warning("gradient_accumulate_steps is not supported yet; using 1")
        options = SignRoundOptions(
            iters=self.iters,
            lr=self.lr,
            minmax_lr=self.options["minmax_lr"],
            batch_size=self.batch_size,
            enable_minmax_tuning=self.options["enable_minmax_tuning"],
            not_use_best_mse=self.options["not_use_best_mse"],
            enable_adam=self.options["enable_adam"],
            seed=self.seed,
        )
        calib = calibration_batch(self.dataset, self.tokenizer, self.nsamples, self.seqlen, self.seed)
        blocks = [
            (f"{list_name}.{i}", block)
            for list_name in self.block_names
            for i, block in enumerate(self.model.get_submodule(list_name))
        ]
        start = time.time()
        self.layers = signround_blocks(
            self.model, blocks, self.plan.quantize, calib, options, self.options["enable_quanted_input"]
        )
        logger.info(
            "SignRound done in %.1fs: %d layers quantized (%s, iters %d), %d kept in float",
            time.time() - start, len(self.layers), self.scheme.describe(), self.iters, len(self.plan.keep_float),
        )

    def _settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"iters": self.iters}
        if self.iters > 0:
            settings["lr"] = self.lr if self.lr is not None else 1.0 / self.iters
        if self.iters == 0:
            settings["disable_opt_rtn"] = self.disable_opt_rtn
        if self.iters > 0 or not self.disable_opt_rtn:
            settings.update(nsamples=self.nsamples, seqlen=self.seqlen)
            if isinstance(self.dataset, str):
                settings["dataset"] = self.dataset
        return settings

    def save_quantized(self, output_dir: str | os.PathLike, format: str = "auto_round", inplace: bool = True) -> list[str]:
        """Write one checkpoint per format (comma-separated); with several formats, one subfolder each."""
        fmts = parse_formats(format)
        check_output_dir(output_dir)
        if not self.quantized:
            raise AutoRoundError("call quantize() before save_quantized(), or use quantize_and_save()")
        for fmt in fmts:  # formats chosen after quantize() must still hold the schemes used
            adapt = getattr(fmt, "adapt_scheme", None)
            if adapt is not None:
                adapt(self.scheme, switch=False)
            if self.plan is not None and not self.plan.quantize and getattr(fmt, "float_model_ok", False):
                continue
            compressor.plan_layers(self.linears, self.scheme, self.layer_config, [fmt], self.ignore_layers)
        paths = []
        for fmt in fmts:
            out = str(output_dir) if len(fmts) == 1 else os.path.join(str(output_dir), fmt.name)
            paths.append(
                compressor.export(
                    fmt, self.model, self.layers, self.plan, self.scheme, self.block_names, out, self.tokenizer,
                    self._settings(),
                )
            )
        return paths

    def quantize_and_save(
        self, output_dir: str | os.PathLike = "tmp_autoround", format: str = "auto_round", inplace: bool = True
    ) -> tuple[Any, list[str]]:
        """Check the output folder and formats first, then quantize and save; returns (model, folders)."""
        check_output_dir(output_dir)
        self.quantize(format)
        return self.model, self.save_quantized(output_dir, format)


class AutoScheme:
    """Mixed-bit automatic scheme search (per-layer bit allocation under an average-bits budget)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "AutoScheme (automatic mixed-bit search) is not yet supported by autoround; pass a fixed scheme such "
            "as scheme='W4A16' and per-layer overrides with layer_config={'name': {'bits': 8}}"
        )
