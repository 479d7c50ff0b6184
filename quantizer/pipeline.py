"""One quantization run, stage by stage, in the order this module owns:

    load -> transform -> plan -> calibrate -> quantize -> export -> evaluate

``Pipeline`` holds what each stage gives the next (the model and its quantizable linears, the ``LayerPlan``,
the calibration batch, the packed layers) and calls the stage modules: ``model_io`` / ``model_free`` (load),
``transforms`` (transform), ``plan`` (plan), ``data`` / ``importance`` (calibrate), ``quantize`` (RTN and
optimized RTN) or ``blockwise`` (SignRound) (quantize), ``formats`` (export) and ``eval`` (evaluate).
``autoround.AutoRound`` is a facade over it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import act_quant, distributed, model_io
from .autoscheme import AutoScheme, allocate, auto_candidates, bits_range, check_options, layer_groups
from .data import calibration_batch, loss_mask, whole_batches
from .devices import outside_blocks_on, resolve_placement
from .dtypes import family_of
from .errors import AutoRoundError, FormatError
from .formats import QuantizedLayer, parse_formats
from .formats import export as export_checkpoint
from .formats.writer import check_output_dir
from .act_quant import check_env as check_act_env, needs_amax, static_amax
from .importance import model_importance
from .options import CalibrationOptions, PlanOptions, RuntimeOptions, SignRoundOptions, TuningOptions
from .plan import LayerPlan, plan_layers, scheme_for_layer
from .quantize import quantize_layers
from .schemes import SCHEME_OVERRIDES, QuantScheme, resolve_scheme
from .moe import router_linears, unfuse_experts
from .transforms import Transform
from .transforms.rotation import (
    HadamardRotation, ResidualRotation, RotationSpec, install_input_rotation, rotation_of,
)
from .. import envs
from ..log import logger
from ..memory import peak_rss_gib

STAGES = ("load", "transform", "plan", "calibrate", "quantize", "export", "evaluate")

# set by load(); until then (a folder whose plain RTN may take the model-free route) they load the model on use
LOADED_ATTRS = ("model", "tokenizer", "block_names", "conv1d_names", "linears", "lm_head_name", "lm_head_tied",
                "source_tensors")


@dataclass(frozen=True)
class RunOptions:
    """The four option groups of one run (``options.build_options``)."""

    plan: PlanOptions
    calibration: CalibrationOptions
    tuning: TuningOptions
    runtime: RuntimeOptions


@dataclass
class Calibration:
    """What the calibrate stage gives the quantize stage: the ``[nsamples, seqlen]`` token batch, its loss mask
    (SignRound) and the per-layer input importance (optimized RTN)."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor | None = None
    importance: dict[str, torch.Tensor] | None = None
    # the largest |input| of each layer whose activation quantization needs one (``act_quant.needs_amax``)
    input_amax: dict[str, torch.Tensor] | None = None


class Pipeline:
    """The state of one run and its stages.  ``source``: a folder, hub id, .gguf file or loaded model;
    ``tokenizer``: optional (loaded with the model otherwise); ``transforms``: applied in order by the
    transform stage."""

    def __init__(
        self, options: RunOptions, source: Any, tokenizer: Any = None, transforms: list[Transform] | None = None
    ) -> None:
        self.options, self.source = options, source
        # a missing device fails here, before work; several devices: ``devices.Placement``
        self.placement = resolve_placement(options.runtime.device_map)
        self.device = self.placement.device
        # torchrun: the process group this run's ranks share (``distributed.py``); SINGLE for one process
        self.group = distributed.current()
        if self.group.active and self.placement.several:
            raise AutoRoundError(
                f"device_map={options.runtime.device_map!r} spreads each block over {self.placement.describe()}, "
                "but under torchrun every rank tunes on one device (its LOCAL_RANK): pass device_map='auto' or "
                "one device, or run one process with the device map"
            )
        if self.group.active and self.device.type == "cuda":  # one GPU per rank, as torchrun numbers them
            self.device = torch.device("cuda", envs.LOCAL_RANK or 0)
        self.transforms: list[Transform] = list(transforms or [])
        p = options.plan
        rotation = RotationSpec.parse(p.rotation_config)
        if rotation is not None:
            self.transforms.append(HadamardRotation(rotation) if rotation.mode == "online" else ResidualRotation(rotation))
        self._applied: list[Transform] = []
        self.auto_scheme: AutoScheme | None = p.scheme if isinstance(p.scheme, AutoScheme) else None
        if self.placement.several and (self.auto_scheme is not None or self.transforms):
            what = "scheme=AutoScheme(...) scores the options" if self.auto_scheme is not None else \
                "rotation_config rotates the model"
            raise AutoRoundError(
                f"device_map={options.runtime.device_map!r} spreads the blocks over {self.placement.describe()}, but "
                f"{what} on one device: pass one device (e.g. device_map={str(self.device)!r})"
            )
        if self.auto_scheme is not None:
            given = [n for n in SCHEME_OVERRIDES if getattr(p, n) is not None]
            if given:
                raise AutoRoundError(
                    f"{', '.join(given)} cannot be combined with scheme=AutoScheme(...): put those settings in the "
                    "AutoScheme options instead (e.g. options='W2A16G64,W4A16')"
                )
            if p.quant_nontext_module:
                raise AutoRoundError(
                    "quant_nontext_module=True cannot be combined with scheme=AutoScheme(...): AutoScheme scores "
                    "layers with the text loss, which never reaches the vision/audio towers"
                )
            quantized = [o for o in self.auto_scheme.schemes if not o.is_float]
            if not quantized:
                raise AutoRoundError("AutoScheme options are all float (BF16): add at least one quantized scheme")
            self.scheme = quantized[0]  # the plan's default; AutoScheme sets every layer explicitly
        else:
            self.scheme = resolve_scheme(p.scheme, **{n: getattr(p, n) for n in SCHEME_OVERRIDES})
        # the per-layer schemes AutoScheme chose (exact layer names), on top of layer_config
        self.chosen_config: dict[str, QuantScheme] = {}
        self.layer_config = dict(p.layer_config or {})
        self.ignore_layers = name_list(p.ignore_layers)
        # resume: the output folder whose hidden sibling keeps SignRound's finished blocks, and whether to continue
        self.resume_dir: str | None = None
        self.resume = False
        self.resume_store = None
        self.layers: dict[str, QuantizedLayer] = {}
        self.plan: LayerPlan | None = None
        self.quantized = False
        # streamed tuning (``streaming.py``): the opened folder and the scratch folder of the packed layers
        self.stream: Any = None
        self.stage_dir: Path | None = None
        self.stager: Any = None
        # a local folder may never need the whole model in memory (the model-free route and streamed tuning read
        # the weights from its files): its load waits until something asks for it (the model, quantize(), a
        # format that needs it)
        self.deferred_folder = self._model_free_folder()
        if options.runtime.model_free and (self.deferred_folder is None or self.model_free_reason() is not None):
            why = self.model_free_reason() or "it reads a local model folder with a config.json"
            raise AutoRoundError(f"model_free=True: this run cannot take the model-free route ({why})")
        if tokenizer is not None or self.deferred_folder is None:
            self.tokenizer = tokenizer
        if self.deferred_folder is None:
            self.load()

    @property
    def loaded(self) -> bool:
        """Whether the load stage has run (the model is in memory)."""
        return "model" in self.__dict__

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set yet: those of a model whose load was deferred
        written = self.__dict__.get("streamed_to")
        if name == "model" and written is not None:
            raise AutoRoundError(
                "this run was tuned streamed (low_cpu_mem_usage): the quantized model was never whole in memory; "
                f"load the checkpoint written to {written[0]} (AutoModelForCausalLM.from_pretrained), or pass "
                "low_cpu_mem_usage=False to keep the quantized model in memory"
            )
        if name in LOADED_ATTRS and self.__dict__.get("deferred_folder") is not None:
            if name == "tokenizer":  # the tokenizer alone does not need the model
                self.tokenizer = model_io.load_tokenizer(self.deferred_folder)
            else:
                logger.info("loading the model from %s", self.deferred_folder)
                self.load()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- load -----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and find what to quantize in it."""
        self.model, self.tokenizer = model_io.load_model(
            self.source, self.__dict__.get("tokenizer"),
            # several devices: the model stays in host memory, each block goes to its devices in turn
            device_map=None if self.device.type == "cpu" or self.placement.several else str(self.device),
        )
        self.deferred_folder = None
        self.source_tensors = model_io.uninstantiated_tensors(self.source, self.model)
        if self.source_tensors:
            names = sorted(self.source_tensors)
            logger.info("%d tensors of the source are not part of the model class (e.g. %s: multi-token-prediction "
                        "layers); the checkpoint keeps them as stored", len(names), names[0])
        self._inspect()

    def load_streamed(self) -> bool:
        """The load stage of streamed tuning: the folder opened with only the weights outside the blocks read
        in (``streaming.StreamedModel``); False (with the reason logged) where it cannot be reproduced that way."""
        from . import model_free
        from .streaming import StreamedModel, log_route

        folder = self.deferred_folder
        try:
            src = model_free.open_model(folder, self.block_names_option(), real_buffers=True)
        except model_free.Declined as exc:
            logger.info("in-memory route: loading the model (streamed tuning cannot reproduce it: %s)", exc)
            return False
        if src.transposed:
            src.close()
            logger.info("in-memory route: loading the model (streamed tuning does not read GPT-2 Conv1D weights)")
            return False
        self.stream = StreamedModel(src)
        self.model = src.skeleton
        if self.device.type != "cpu":  # the model stays in host memory; each block visits the device in its turn
            self.placement = dataclasses.replace(self.placement, host=True)
        if self.__dict__.get("tokenizer") is None:
            self.tokenizer = model_io.load_tokenizer(folder)
        self.deferred_folder = None
        self.source_tensors = {}  # open_model declines a folder holding tensors the model has no place for
        log_route(src)
        self._inspect()
        return True

    def _inspect(self) -> None:
        """Find the blocks, the layers to quantize and the output projection of the loaded model."""
        self.model.eval()
        self.block_names = self.block_names_option() or model_io.find_block_names(self.model)
        # GPT-2-style Conv1D layers become nn.Linear while quantizing, and are restored afterwards
        self.conv1d_names = model_io.conv1d_to_linear(self.model, self.block_names)
        # transformers' fused 3-D experts become one set of linear layers per expert (``moe.py``)
        self.expert_modules = unfuse_experts(self.model)
        if self.expert_modules:
            n = self.model.get_submodule(self.expert_modules[0]).num_experts
            logger.info("MoE: %d experts modules of %d experts each are quantized expert by expert (routers stay "
                        "float)", len(self.expert_modules), n)
        self.linears = model_io.quantizable_linears(self.model, self.block_names)
        if self.options.plan.quant_nontext_module:
            towers = model_io.nontext_block_names(self.model)
            if not towers:
                raise AutoRoundError(
                    f"quant_nontext_module=True: {type(self.model).__name__} has no vision/audio blocks outside its "
                    "text decoder; leave it unset"
                )
            nontext = model_io.quantizable_linears(self.model, towers)
            self.linears.update(nontext)
            logger.info("quant_nontext_module: %d layers of %s are quantized too, with plain RTN ranges (the "
                        "calibration data is text, which never reaches them)", len(nontext), ", ".join(towers))
        routers = router_linears(self.linears, self.expert_modules)
        for name in routers:  # a router's few outputs decide which experts run: kept float, as the reference
            del self.linears[name]
        if routers:
            logger.info("MoE: %d router layers stay float (e.g. %s)", len(routers), routers[0])
        quant_head = self.options.plan.quant_lm_head or self._head_in_layer_config()
        self.lm_head_name, self.lm_head_tied = self._find_lm_head() if quant_head else (None, False)
        if self.lm_head_name is not None:
            self.linears[self.lm_head_name] = self.model.get_submodule(self.lm_head_name)

    def block_names_option(self) -> list[str] | None:
        blocks = self.options.plan.to_quant_block_names
        return name_list(blocks) if blocks else None

    def _output_projection(self) -> tuple[str | None, nn.Linear | None]:
        """(module name, module) of the model's linear output projection, or (None, None)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            return None, None
        return next(n for n, m in self.model.named_modules() if m is head), head

    def _head_in_layer_config(self) -> bool:
        """Whether ``layer_config`` names the output projection itself (its exact module name) with a quantized
        scheme: that quantizes it, as ``quant_lm_head`` does (a pattern that happens to match it does not)."""
        name, _ = self._output_projection()
        if name is None or name not in self.layer_config:
            return False
        return not scheme_for_layer(name, self.scheme, {name: self.layer_config[name]}).is_float

    def _find_lm_head(self) -> tuple[str | None, bool]:
        """(name, tied to the input embedding) of the output projection to quantize."""
        name, head = self._output_projection()
        if head is None:
            raise AutoRoundError("quant_lm_head: this model has no linear output projection (lm_head) to quantize")
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        tied = emb is not None and getattr(emb, "weight", None) is head.weight
        return name, tied

    def _model_free_folder(self) -> str | None:
        """The folder whose load may be deferred (plain RTN of a local folder, or streamed tuning), after
        checking its files."""
        if self.model_free_reason() is not None and self.stream_reason() is not None:
            return None
        path = Path(str(self.source)).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            return None  # the normal load reports what is wrong
        model_io.check_safetensors(path)  # a corrupt file fails now, as it does when the model is loaded here
        return str(path)

    def model_free_reason(self, fmts: list | None = None) -> str | None:
        """Why the model-free route cannot write this run's checkpoint, or None when it can."""
        tuning, runtime = self.options.tuning, self.options.runtime
        if runtime.disable_model_free:
            return "disable_model_free=True"
        if self.auto_scheme is not None:
            return "AutoScheme scores the options on the loaded model"
        if tuning.iters > 0:
            return "SignRound (iters > 0) runs the model"
        if not tuning.disable_opt_rtn:
            return "optimized RTN runs the model on calibration data (disable_opt_rtn=True does not)"
        if not isinstance(self.source, (str, os.PathLike)):
            return "the model was passed already loaded"
        path = Path(str(self.source)).expanduser()
        if path.suffix.lower() == ".gguf":
            return "the model is a GGUF file"
        if not path.is_dir():
            return "the model is not a local folder"
        if self.options.plan.quant_lm_head:
            return "quant_lm_head is set"
        if self.options.plan.quant_nontext_module:
            return "quant_nontext_module is set"
        if any(k == "lm_head" or k.endswith(".lm_head") for k in self.layer_config):
            return "layer_config names lm_head"
        if self.device.type != "cpu" or self.placement.several:
            return f"device_map={runtime.device_map!r} places the model on {self.placement.describe()}"
        if self.transforms:
            return "transforms rewrite the loaded model"
        for fmt in fmts or []:
            if not fmt.model_free:
                return f"format {fmt.name!r} is written from the loaded model"
        if fmts is not None and (self.scheme.is_float or not family_of(self.scheme).model_free):
            return f"scheme {self.scheme.describe()} is not plain integer RTN"
        if needs_amax(self.scheme):
            return "static activation scales come from calibration data"
        return None

    def stream_reason(self, fmts: list | None = None) -> str | None:
        """Why this run cannot tune streamed (``streaming.py``), or None when it can."""
        runtime = self.options.runtime
        if not runtime.low_cpu_mem_usage:
            return "low_cpu_mem_usage=False"
        tuning = self.options.tuning
        if runtime.disable_model_free and tuning.iters == 0 and tuning.disable_opt_rtn:
            return "disable_model_free=True"  # plain RTN: it loads the model
        if not isinstance(self.source, (str, os.PathLike)):
            return "the model was passed already loaded"
        path = Path(str(self.source)).expanduser()
        if path.suffix.lower() == ".gguf":
            return "the model is a GGUF file"
        if not path.is_dir():
            return "the model is not a local folder"
        if self.options.plan.quant_nontext_module:
            return "quant_nontext_module is set"
        if self.transforms:
            return "transforms rewrite the whole loaded model"
        for fmt in fmts or []:
            if not fmt.streams:
                return f"format {fmt.name!r} is written from the whole model"
        return None

    # -- transform ------------------------------------------------------------------------------------
    def transform(self) -> None:
        """Apply the run's transforms in order (each once: a second quantize() does not repeat them)."""
        for t in self.transforms:
            if t in self._applied:
                continue
            logger.info("transform: %s", t.name)
            self.linears = t.apply(self.model, self.linears, self.block_names)
            self._applied.append(t)

    # -- plan -----------------------------------------------------------------------------------------
    def adapt_scheme(self, fmts: list, check_transforms: bool = True) -> None:
        """Formats that fix the scheme (gguf:q4_k_m needs GGUF:Q4_K_M) adapt it before any work; AutoScheme's
        options must each be writable as they are (and, with ``check_transforms``, the transforms' output)."""
        if check_transforms:
            self.check_transforms(fmts)
        if self.auto_scheme is not None:
            check_options(self.auto_scheme, fmts)
            return
        for fmt in fmts:
            self.scheme = fmt.adapt_scheme(self.scheme)

    def check_transforms(self, fmts: list) -> None:
        """Every format must be able to write what the run's transforms (and the load stage's unfused MoE experts)
        make of the model (before any work)."""
        for t in self.transforms:
            for fmt in fmts:
                err = t.format_error(fmt)
                if err:
                    raise FormatError(err)
        experts = self.__dict__.get("expert_modules")
        for fmt in fmts if experts else []:
            if fmt.moe_experts is None:
                raise FormatError(
                    f"format {fmt.name!r} cannot write this MoE model's experts (quantized expert by expert: "
                    f"{experts[0]}.0.gate_proj, ...); write auto_round (our transformers loader reads it) or fake"
                )

    def default_format(self, log: bool = False) -> str:
        """The format used when none is named: auto_round where it holds the run's schemes, else the format
        named after the (first) scheme (GGUF:Q4_K_M -> gguf:q4_k_m, as the reference), else llm_compressor (INT8_W8A8,
        and AutoScheme options that mix integer and float weights), else auto_round (whose refusal names the
        formats that can hold the scheme).  MX / NVFP4 / FP8 schemes are written as auto_round in the packings
        the reference gives them."""
        name = self._default_format()
        if log and name != "auto_round":
            logger.info("format: %s (auto_round cannot hold %s)", name, self.scheme.describe())
        return name

    def _default_format(self) -> str:
        from .formats import get_format, list_formats

        schemes = [o for o in self.auto_scheme.schemes if not o.is_float] if self.auto_scheme else [self.scheme]
        for name in ("auto_round", schemes[0].data_type, "llm_compressor"):
            fmt = get_format(name) if name in list_formats() else None
            if (fmt is not None and all(fmt.scheme_error(s) is None for s in schemes) and not fmt.mix_error(schemes)
                    and not any(t.format_error(fmt) for t in self.transforms)):
                return name
        return "auto_round"  # its refusal names the formats that can hold the scheme

    def make_plan(self, fmts: list) -> LayerPlan:
        """The scheme of every layer the formats can hold, and the layers kept float."""
        return plan_layers(
            self.linears, self.scheme, {**self.layer_config, **self.chosen_config}, fmts, self.ignore_layers,
            lm_head=self.lm_head_name, lm_head_tied=self.lm_head_tied,
        )

    def auto_plan(self, fmts: list) -> LayerPlan:
        """AutoScheme: score every option on the calibration data and choose a scheme per layer under the
        budget, then plan with those choices."""
        from .model_io import final_norm
        from .sensitivity import delta_loss_scores, streamed_importance

        auto = self.auto_scheme
        free, fixed = auto_candidates(auto, self.linears, self.layer_config, self.ignore_layers, fmts)
        shapes = {n: (m.in_features, m.out_features) for n, m in self.linears.items()}
        low, high = bits_range(auto, shapes, free, fixed)
        logger.info("AutoScheme: average bits range of these options [%.3f, %.3f], target %.3f", low, high,
                    auto.avg_bits)
        if auto.avg_bits > high + 1e-9:
            raise AutoRoundError(
                f"AutoScheme avg_bits={auto.avg_bits} is above the dearest choice of these options ({high:.4f} bits "
                "per weight); lower avg_bits or add a wider option such as W8A16 or BF16"
            )
        if auto.avg_bits < low - 1e-9:
            raise AutoRoundError(
                f"AutoScheme avg_bits={auto.avg_bits} is below the cheapest choice of these options ({low:.4f} bits "
                "per weight, layers fixed by layer_config or kept float included); raise avg_bits or add a cheaper "
                "option"
            )
        groups = layer_groups(list(free), self.block_names, auto.shared_layers)
        c, tuning = self.options.calibration, self.options.tuning
        nsamples, seqlen, batch_size = auto.scoring()
        tokens = calibration_batch(auto.dataset if auto.dataset is not None else c.dataset, self.tokenizer,
                                   nsamples, seqlen, tuning.seed)
        tokens = self.group.broadcast(tokens)  # torchrun: every rank scores its share of rank 0's samples
        mask = loss_mask(tokens, getattr(self.tokenizer, "pad_token_id", None))
        proj = self.model.get_output_embeddings()
        if proj is None:
            raise AutoRoundError("AutoScheme needs the model's output projection (lm_head) for its loss; none found")
        blocks = [(f"{ln}.{i}", b) for ln in self.block_names for i, b in enumerate(self.model.get_submodule(ln))]
        head_name = self.lm_head_name if self.lm_head_name in {**free, **fixed} else None
        start = time.time()
        logger.info("AutoScheme: scoring %d options on %d x %d calibration tokens", len(auto.schemes), *tokens.shape)
        # the model in host memory (streamed on an accelerator): the blocks visit the device as they are scored
        with outside_blocks_on(self.placement, self.model, self.block_names):
            importance = None
            if tuning.iters > 0 or not tuning.disable_opt_rtn:
                # the run ends with importance-weighted quantizers (optimized RTN, or SignRound from its searched
                # start): score the options with them, not with plain RTN's larger low-bit errors
                scored = {n: self.linears[n] for n in free if n != self.lm_head_name}
                if self.stream is not None:  # the blocks' weights are read in one block at a time
                    importance = streamed_importance(self.model, blocks, scored, tokens, batch_size, self.stream,
                                                     group=self.group)
                else:
                    importance = model_importance(self.model, scored, tokens, batch_size, group=self.group)
            scores = delta_loss_scores(
                self.model, blocks, self.linears,
                [{n: (s[k] if not s[k].is_float else None) for n, s in free.items()} for k in range(len(auto.schemes))],
                fixed, tokens, mask, batch_size, (final_norm(self.model), proj, head_name),
                cache_device="cpu" if self.options.runtime.low_gpu_mem_usage else None, importance=importance,
                group=self.group, stream=self.stream,
            )
        result = allocate(auto, shapes, free, fixed, groups, scores)
        logger.info(
            "AutoScheme: target %.4f bits, achieved %.4f (%s) in %.1fs; layers per option: %s",
            auto.avg_bits, result.achieved_bits,
            "weights only" if auto.ignore_scale_zp_bits else "scales and zero points counted",
            time.time() - start, ", ".join(f"{k}: {v}" for k, v in result.counts.items()),
        )
        self.chosen_config = {n: result.schemes[n] for n in free}
        self.auto_result, self.auto_scores, self.auto_groups = result, scores, groups
        return self.make_plan(fmts)

    def _untie_lm_head(self) -> None:
        """Give a tied lm_head its own weight before it is quantized (the embedding stays float)."""
        if self.lm_head_name is None or not self.lm_head_tied or self.lm_head_name not in self.plan.quantize:
            return
        head = self.model.get_submodule(self.lm_head_name)
        if head.weight is not self.model.get_input_embeddings().weight:
            return  # already untied by an earlier quantize()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.model.config.tie_word_embeddings = False
        logger.info("untied %s from the input embedding to quantize it", self.lm_head_name)

    # -- calibrate ------------------------------------------------------------------------------------
    def calibrate(self) -> Calibration | None:
        """The calibration batch, with what the quantize stage needs of it; None for plain RTN."""
        tuning = self.options.tuning
        static = [n for n, s in self.plan.quantize.items() if needs_amax(s)]
        if tuning.iters <= 0 and tuning.disable_opt_rtn and not static:
            return None
        c = self.options.calibration
        tokens = calibration_batch(c.dataset, self.tokenizer, c.nsamples, c.seqlen, tuning.seed)
        if self.group.active:  # every rank splits the same samples: rank 0's
            tokens = self.group.broadcast(tokens)
            _, usable = whole_batches(len(tokens), tuning.batch_size)  # the samples the block loops will run
            if usable < self.group.world_size:
                raise AutoRoundError(
                    f"{usable} calibration samples cannot be split across {self.group.world_size} ranks: raise "
                    f"nsamples to at least {self.group.world_size} (a multiple of batch_size), or start fewer processes"
                )
        if tuning.iters > 0:
            return Calibration(tokens, loss_mask=loss_mask(tokens, getattr(self.tokenizer, "pad_token_id", None)))
        if self.stream is not None or self.placement.several:  # measured block by block (``blockwise.rtn_blocks``)
            return Calibration(tokens)
        logger.info("collecting activation statistics on %d x %d calibration tokens", *tokens.shape)
        amax: dict[str, torch.Tensor] = {}
        names = self.plan.quantize if not tuning.disable_opt_rtn else static
        importance = model_importance(
            self.model, {n: self.linears[n] for n in names if n != self.lm_head_name}, tokens,
            tuning.batch_size, amax=amax, group=self.group,
        )
        unseen = [n for n in names if n != self.lm_head_name and n not in amax]
        if unseen:
            logger.info("%d layers saw no calibration token (e.g. %s: an MoE expert no token was routed to, a vision "
                        "tower); they are "
                        "quantized with plain RTN ranges", len(unseen), unseen[0])
        return Calibration(tokens, importance=None if tuning.disable_opt_rtn else importance,
                           input_amax=static_amax({n: self.plan.quantize[n] for n in static
                                                   if n != self.lm_head_name}, amax))

    # -- quantize -------------------------------------------------------------------------------------
    def quantize(self, formats: "str | list | None" = None, exporting: bool = False) -> tuple[Any, dict[str, Any]]:
        """load -> transform -> plan -> calibrate -> quantize, in memory (weights become their fake-quantized
        values); returns (model, layer_config).  ``exporting``: ``formats`` will be written after (what cannot be
        written is refused before any tuning)."""
        if self.options.runtime.model_free:
            raise AutoRoundError("model_free=True writes the checkpoint straight from the model's files: call "
                                 "quantize_and_save(output_dir, format=...) instead of quantize()")
        fmts = parse_formats(formats or self.default_format())
        # with no format named, the default one only plans the schemes: what the transforms made of the model is
        # checked against the format save_quantized() is given
        writing = formats is not None or exporting
        self.adapt_scheme(fmts, check_transforms=writing)
        if self.stream is None:
            self.__dict__.pop("streamed_to", None)  # a new run in memory
        if not self.loaded:
            self.load()
        self.transform()
        if writing:
            self.check_transforms(fmts)
        if self.scheme.is_float and all(f.float_model_ok for f in fmts):
            # e.g. gguf:bf16: a float file, nothing to quantize
            self.plan = LayerPlan(keep_float=list(self.linears))
            self.layers = {}
            self._finish()
            return self.model, self.layer_config_out()
        self.plan = self.auto_plan(fmts) if self.auto_scheme is not None else self.make_plan(fmts)
        for t in self._applied:
            t.settle(self.model, set(self.plan.quantize))
        check_act_env(self.plan.quantize, self.options.tuning.iters,
                      self.options.tuning.enable_minmax_tuning, exporting)
        self._check_static_outside()
        self._check_placement()
        self._untie_lm_head()
        tuning = self.options.tuning
        torch.manual_seed(tuning.seed)
        if self.options.runtime.enable_deterministic_algorithms:
            torch.use_deterministic_algorithms(True, warn_only=False)
        start = time.time()
        if tuning.iters > 0:
            try:
                options = SignRoundOptions(**dataclasses.asdict(tuning))
            except ValueError as exc:
                raise AutoRoundError(str(exc)) from None
            self._signround(options, self.calibrate(), fmts)
            self._quantize_outside_blocks()
            self._finish()
            return self.model, self.layer_config_out()
        if self.resume:
            logger.info("--resume has nothing to resume with iters 0 (round-to-nearest runs in one pass)")
        calibration = self.calibrate()
        if self.stream is not None or self.placement.several:
            self._rtn_blockwise(calibration, fmts)
        else:
            importance = calibration.importance if calibration is not None else None
            self.layers = quantize_layers(self.linears, self.plan, importance, envs.AR_SEARCH_SCALE_RATIO,
                                          calibration.input_amax if calibration is not None else None)
        self._finish()
        logger.info(
            "%s done in %.1fs: %d layers quantized (%s), %d kept in float",
            "RTN" if tuning.disable_opt_rtn else "optimized RTN",
            time.time() - start, len(self.layers), self.scheme.describe(), len(self.plan.keep_float),
        )
        return self.model, self.layer_config_out()

    def _check_static_outside(self) -> None:
        """A static activation scale needs the layer's calibrated input range: SignRound measures it for the layers
        inside the blocks and for the lm_head, RTN in memory for every layer but the lm_head (its calibration runs
        the decoder body), block-by-block RTN (streamed, several devices) for the layers inside the blocks.  A
        planned layer outside what the run measures is refused before work."""
        iters = self.options.tuning.iters
        blockwise = iters > 0 or self.stream is not None or self.placement.several
        prefixes = tuple(f"{b}." for b in self.block_names)
        for name, scheme in self.plan.quantize.items():
            if not needs_amax(scheme) or name.startswith(prefixes):
                continue
            if name == self.lm_head_name and iters <= 0:
                raise AutoRoundError(
                    f"{name} is planned as {scheme.describe()}, whose activation scale comes from the calibrated "
                    "input range, which only SignRound (iters > 0) measures for the lm_head; use iters > 0, or keep "
                    "the lm_head out (quant_lm_head=False) or give it a dynamic-activation or weight-only scheme in "
                    "layer_config"
                )
            if name != self.lm_head_name and blockwise:
                how = "SignRound" if iters > 0 else "block-by-block RTN (streamed or on several devices)"
                raise AutoRoundError(
                    f"{name} is planned as {scheme.describe()}, whose activation scale comes from the calibrated "
                    f"input range, but it sits outside the blocks {how} calibrates ({', '.join(self.block_names)}); "
                    "give it a dynamic-activation or weight-only scheme in layer_config, or keep it float "
                    "(ignore_layers)"
                )

    def _check_placement(self) -> None:
        """A ``device_map`` dict whose keys match none of the planned layers inside the blocks is refused (before
        any tuning minute); several devices are logged with where each block runs."""
        placement = self.placement
        if not placement.several:
            return
        inside = [n for n in self.plan.quantize if n.startswith(tuple(f"{b}." for b in self.block_names))]
        unmatched = placement.unmatched(inside, self.block_names)
        if unmatched:
            example = inside[0] if inside else "model.layers.0.self_attn.q_proj"
            raise AutoRoundError(
                f"device_map key(s) {', '.join(map(repr, unmatched))} match no quantized layer inside the blocks "
                f"(keys are layer names or regular expressions, full like {example!r} or relative to their block "
                f"like {example.rsplit('.', 2)[-2] + '.' + example.rsplit('.', 1)[-1]!r} or 'mlp'); modules outside "
                f"the blocks run on the main device, {self.device}"
            )
        how = "by the device_map's keys" if placement.rules else "in runs of about equal weight bytes"
        logger.info("device_map: each block is tuned on %s with its quantized layers spread over %s %s; the model "
                    "stays in host memory between blocks", self.device, placement.describe(), how)

    def _blocks(self) -> list[tuple[str, nn.Module]]:
        return [
            (f"{list_name}.{i}", block)
            for list_name in self.block_names
            for i, block in enumerate(self.model.get_submodule(list_name))
        ]

    def _block_stream(self, fmts: list) -> Any:
        """Streamed tuning's ``BlockStream``: every format's packing of the planned layers is fixed now (from
        their schemes and shapes), so each block's layers are packed as soon as it is tuned."""
        from .formats import ExportJob
        from .streaming import BlockStream, Stager, stub_layers

        job = ExportJob(model=self.model, layers=stub_layers(self.plan.quantize, self.linears), scheme=self.scheme,
                        block_names=self.block_names, float_layers=self.plan.keep_float)
        # under torchrun rank 0 alone packs and writes; the other ranks drop each block's layers once tuned
        self.stager = Stager(fmts, job, self.stage_dir) if self.group.is_main else None
        return BlockStream(self.stream, self.stager)

    def _rtn_blockwise(self, calibration: Calibration | None, fmts: list) -> None:
        """RTN / optimized RTN block by block (on the streamed model, or on the blocks spread over several
        devices), then the planned layers outside the blocks."""
        from .blockwise import rtn_blocks

        tuning = self.options.tuning
        optimized = not tuning.disable_opt_rtn
        schemes = {n: s for n, s in self.plan.quantize.items() if n != self.lm_head_name}
        with outside_blocks_on(self.placement, self.model, self.block_names):
            self.layers = rtn_blocks(
                self.model, self._blocks(), schemes, calibration.tokens if calibration is not None else None,
                tuning.batch_size, optimized, envs.AR_SEARCH_SCALE_RATIO,
                stream=self._block_stream(fmts) if self.stream is not None else None, group=self.group,
                placement=self.placement, rtn_rounding=self.plan.rtn_rounding,
            )
        self._quantize_outside_blocks()

    def _signround(self, options: SignRoundOptions, calibration: Calibration, fmts: list | None = None) -> None:
        from .block_runner import resolve_amp
        from .blockwise import signround_blocks
        from .resume import ResumeStore, model_digest, resume_dir_for, tensor_digest

        blocks = self._blocks()
        store = None
        if self.resume_dir is not None and self.group.is_main:  # rank 0's store, its blocks broadcast to the others
            # amp as this run resolves it (off where bf16 is slow here): blocks tuned under another amp policy
            # must not be mixed into this checkpoint
            options = resolve_amp(options, self.placement.device if self.placement.in_host
                                  else next(self.model.parameters()).device)
            fingerprint = {
                "model": model_digest(self.model, self.stream.read if self.stream is not None else None),
                "calibration": tensor_digest(calibration.tokens),
                "schemes": {n: s.to_dict() for n, s in self.plan.quantize.items()},
                # every tuning option but the one that only concerns iters 0
                "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "disable_opt_rtn"},
                # what decides which activation clip ratios are tuned
                "act_env": [envs.AR_ACT_SCALE, envs.AR_ENABLE_ACT_MINMAX_TUNING],
            }
            store = ResumeStore.open(resume_dir_for(self.resume_dir), fingerprint, self.resume, logger)
        lm_head = None
        if self.lm_head_name is not None:
            lm_head = (self.lm_head_name, model_io.final_norm(self.model), self.linears[self.lm_head_name])
        cache_device = "cpu" if self.options.runtime.low_gpu_mem_usage else None
        start = time.time()
        with outside_blocks_on(self.placement, self.model, self.block_names):
            self.layers = signround_blocks(
                self.model, blocks, self.plan.quantize, calibration.tokens, options, options.enable_quanted_input,
                loss_mask=calibration.loss_mask, resume=store, cache_device=cache_device,
                compile_forward=self.options.runtime.enable_torch_compile,
                lm_head=lm_head, stream=self._block_stream(fmts) if self.stream is not None else None,
                group=self.group, placement=self.placement,
            )
        self.resume_store = store
        logger.info(
            "SignRound done in %.1fs: %d layers quantized (%s, iters %d), %d kept in float",
            time.time() - start, len(self.layers), self.scheme.describe(), options.iters, len(self.plan.keep_float),
        )

    def _quantize_outside_blocks(self) -> None:
        """SignRound tunes the blocks; planned layers outside them (lm_head) are rounded to nearest."""
        rest = [n for n in self.plan.quantize if n not in self.layers]
        if rest:
            sub = LayerPlan(quantize={n: self.plan.quantize[n] for n in rest}, rtn_rounding=self.plan.rtn_rounding)
            self.layers.update(quantize_layers(self.linears, sub, None, envs.AR_SEARCH_SCALE_RATIO))

    def _finish(self) -> None:
        for name, layer in self.layers.items():  # the exports write a rotated layer's rotation with it
            rot = rotation_of(self.model.get_submodule(name))
            if rot is not None:
                layer.rotation = next(t.spec for t in self._applied
                                      if isinstance(t, (HadamardRotation, ResidualRotation)))
        rotations = {n: rotation_of(self.model.get_submodule(n)) for n in self.conv1d_names}
        model_io.linear_to_conv1d(self.model, self.conv1d_names)
        for name, rot in rotations.items():  # the restored Conv1D layers keep their input rotation and act quant
            module = self.model.get_submodule(name)
            if rot is not None:
                install_input_rotation(module, rot.r)
            if name in self.layers:
                layer = self.layers[name]
                act_quant.install(module, layer.scheme, layer.input_amax, layer.act_ratio)
        self.conv1d_names = []
        self.quantized = True

    def layer_config_out(self) -> dict[str, Any]:
        """Each layer's scheme as quantized, and ``{"bits": 16}`` for those kept float."""
        layer_config: dict[str, Any] = {n: layer.scheme.to_dict() for n, layer in self.layers.items()}
        layer_config.update({n: {"bits": 16} for n in self.plan.keep_float})
        return layer_config

    # -- export ---------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The run's settings recorded in the checkpoint's quantization config."""
        t, c = self.options.tuning, self.options.calibration
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

    def export(self, output_dir: str | os.PathLike, format: str | None = None) -> list[str]:
        """Write one checkpoint per format (comma-separated; None: ``default_format``); with several formats, one
        subfolder each."""
        format = format or self.default_format(log=True)
        fmts = parse_formats(format)
        if not self.group.is_main:  # torchrun: rank 0 writes; the others return its folders once it is done
            return self.group.broadcast(None)
        check_output_dir(output_dir)
        written = self.__dict__.get("streamed_to")
        if written is not None and self.stream is None:
            raise AutoRoundError(
                f"this run was tuned streamed (low_cpu_mem_usage) and its layers were packed straight into "
                f"{', '.join(written)}; to write more formats pass them all to quantize_and_save(format='a,b'), or "
                "set low_cpu_mem_usage=False to keep the quantized model in memory"
            )
        if not self.quantized:
            raise AutoRoundError("call quantize() before save_quantized(), or use quantize_and_save()")
        ratios = [n for n, layer in self.layers.items() if layer.act_ratio is not None]
        if ratios:
            raise AutoRoundError(
                f"{len(ratios)} layers (e.g. {ratios[0]}) carry dynamic-activation clip ratios tuned under "
                "AR_ENABLE_ACT_MINMAX_TUNING, which no checkpoint format can hold (a serving kernel takes a dynamic "
                "scale from each input); evaluate this model in memory, or quantize again without the variable to "
                "export"
            )
        self.check_transforms(fmts)
        for fmt in fmts:  # formats chosen after quantize() must still hold the schemes and shapes used
            if self.auto_scheme is not None:
                check_options(self.auto_scheme, [fmt])
            else:
                fmt.adapt_scheme(self.scheme, switch=False)
            if self.plan is not None and not self.plan.quantize and fmt.float_model_ok:
                continue
            packable = self.make_plan([fmt]).quantize
            lost = [n for n in self.layers if n not in packable]
            if lost:
                raise FormatError(
                    f"format {fmt.name!r} cannot pack {len(lost)} layer(s) that were quantized for other formats "
                    f"(e.g. {lost[0]}: see the warning above); pass every format to quantize() or "
                    "quantize_and_save(format='a,b') so those layers are planned before quantization"
                )
        for fmt in fmts:
            self._warn_rounding(fmt)
        paths = []
        streamed: dict[str, Any] = {}
        if self.stream is not None:  # the float tensors from the source files, the block layers as staged
            self.stager.finish()
            streamed = {"float_tensors": self.stream.src.tensors}
        for fmt in fmts:
            out = str(output_dir) if len(fmts) == 1 else os.path.join(str(output_dir), fmt.name)
            if self.stream is not None:
                streamed["staged"] = self.stager.staged[fmt.name]
            paths.append(
                export_checkpoint(
                    fmt, self.model, self.layers, self.plan, self.scheme, self.block_names, out, self.tokenizer,
                    self.settings(), source_tensors=self.source_tensors, **streamed,
                )
            )
        return self.group.broadcast(paths)

    def _warn_rounding(self, fmt: Any) -> None:
        """Plain RTN rounded integers with the rule of the format planned for (``LayerPlan.rtn_rounding``); a
        format written after quantize() whose readers' rule differs gets integers that are not the nearest for the
        scale it stores, on a fraction of the weights: said once per format, with the way to avoid it."""
        t = self.options.tuning
        if self.plan is None or t.iters > 0 or not t.disable_opt_rtn or fmt.rtn_rounding == self.plan.rtn_rounding:
            return
        hit = [n for n, layer in self.layers.items() if family_of(layer.scheme).rounds_by_format]
        if hit:
            logger.warning(
                "plain RTN rounded %d integer layers (e.g. %s) with the %s scale, as the format planned in quantize() "
                "is written; %s rounds with the %s scale, so some of its integers are one step from the nearest "
                "for the scale it stores. Pass format=%r to quantize() (or quantize_and_save) to round for it",
                len(hit), hit[0], self.plan.rtn_rounding, fmt.name, fmt.rtn_rounding, fmt.name,
            )

    def _export_model_free(self, output_dir: str | os.PathLike, fmts: list) -> list[str] | None:
        """load + plan + quantize + export as one stream from the model folder (``model_free.py``), or None
        when that route declines this model (the caller then loads it)."""
        from . import model_free

        folder = self.deferred_folder
        try:
            src = model_free.open_model(folder, self.block_names_option())
        except model_free.Declined as exc:
            if self.options.runtime.model_free:
                raise AutoRoundError(f"model_free=True: the model-free route cannot reproduce this model ({exc})") from None
            logger.info("in-memory route: loading the model (the model-free route cannot reproduce it: %s)", exc)
            return None
        logger.info(
            "model-free route: plain RTN streamed tensor by tensor from %s without loading the model "
            "(disable_model_free=True loads it instead)", folder,
        )
        self.adapt_scheme(fmts)
        plan = plan_layers(src.linears, self.scheme, self.layer_config, fmts, self.ignore_layers)
        check_act_env(plan.quantize, 0, self.options.tuning.enable_minmax_tuning, True)
        # a tokenizer the user did not pass is loaded only when it is written, after the tensors, so it is not in
        # memory while they stream (about 80 MB for SmolLM2's)
        tokenizer = self.__dict__.get("tokenizer") or model_free.FolderTokenizer(folder)
        paths = []
        for fmt in fmts:
            out = str(output_dir) if len(fmts) == 1 else os.path.join(str(output_dir), fmt.name)
            paths.append(model_free.export(fmt, src, plan, self.scheme, out, tokenizer, self.settings()))
        self.plan = plan
        return paths

    def run(
        self, output_dir: str | os.PathLike, format: str | None = None, resume: bool = False
    ) -> tuple[Any, list[str]]:
        """Every stage through export: the model-free route where it applies, else load -> ... -> export.
        Returns (model, folders); the model is None when the model-free route wrote the checkpoint."""
        with distributed.terminate_as_error(self.group):
            return self._run(output_dir, format, resume)

    def _run(self, output_dir: str | os.PathLike, format: str | None, resume: bool) -> tuple[Any, list[str]]:
        format = format or self.default_format(log=True)
        check_output_dir(output_dir)
        start = time.time()
        fmts = parse_formats(format)
        if self.deferred_folder is not None:
            reason = self.model_free_reason(fmts)
            if reason is None:
                if not self.group.is_main:  # plain RTN from the files needs no samples: rank 0 writes it alone
                    return None, self.group.broadcast(None)
                paths = self._export_model_free(output_dir, fmts)
                if paths is not None:
                    logger.info(
                        "quantize_and_save finished in %.1fs; peak RSS %.2f GiB", time.time() - start, peak_rss_gib()
                    )
                    return None, self.group.broadcast(paths)
            elif self.options.runtime.model_free:
                raise AutoRoundError(f"model_free=True: this run cannot take the model-free route ({reason})")
            stream_why = self.stream_reason(fmts)
            if stream_why is None:
                if self.load_streamed():
                    return None, self._run_streamed(output_dir, format, resume, start)
            else:
                logger.info("in-memory route: loading the model (%s)", "; ".join(dict.fromkeys((reason, stream_why))))
        else:
            reasons = (self.model_free_reason(), self.stream_reason(fmts))
            reason = "; ".join(dict.fromkeys(r for r in reasons if r)) or \
                "the model is already loaded"
            logger.info("in-memory route (%s)", reason)
        self.resume_dir, self.resume = str(output_dir), resume
        self.resume_store = None
        self.quantize(format, exporting=True)
        paths = self.export(output_dir, format)
        if self.resume_store is not None:
            self.resume_store.discard()
        logger.info("quantize_and_save finished in %.1fs; peak RSS %.2f GiB", time.time() - start, peak_rss_gib())
        return self.model, paths

    def _run_streamed(self, output_dir: str | os.PathLike, format: str, resume: bool, start: float) -> list[str]:
        """quantize + export with the blocks streamed (``load_streamed`` has opened the folder); the staged
        layers and the source files' handles are given back whatever happens."""
        from .streaming import remove_staging, staging_dir

        self.resume_dir, self.resume = str(output_dir), resume
        self.resume_store = None
        self.stage_dir = staging_dir(output_dir) if self.group.is_main else None
        folder = str(self.stream.src.folder)
        try:
            self.quantize(format, exporting=True)
            paths = self.export(output_dir, format)
        finally:
            self.stream.close()
            remove_staging(self.stage_dir)
            self.stream = self.stager = self.stage_dir = None
            # the skeleton's blocks hold no weights now: a later use of the model loads it from the folder
            for name in LOADED_ATTRS:
                if name != "tokenizer":
                    self.__dict__.pop(name, None)
            self.deferred_folder = folder
        self.streamed_to = paths
        if self.resume_store is not None:
            self.resume_store.discard()
        logger.info("quantize_and_save finished in %.1fs; peak RSS %.2f GiB", time.time() - start, peak_rss_gib())
        return paths

    # -- evaluate -------------------------------------------------------------------------------------
    def evaluate(self, text: str, seqlen: int = 512, n_windows: int | None = 40, folder: str | None = None) -> float:
        """Perplexity on ``text``: of the model in memory, or (``folder``) of a written checkpoint loaded back
        through transformers, as a user would load it."""
        from .eval import text_perplexity

        if self.tokenizer is None:
            raise AutoRoundError("evaluation needs the model's tokenizer, and none was found with the model")
        if folder is None:
            return text_perplexity(self.model, self.tokenizer, text, seqlen, n_windows)
        return text_perplexity(load_checkpoint(folder), self.tokenizer, text, seqlen, n_windows)

    def evaluate_tasks(self, options: Any, folder: str | None = None, output_dir: str | None = None) -> dict:
        """lm-eval tasks (``lmeval.LmEvalOptions``) on the model in memory or (``folder``) on a written checkpoint
        loaded back through transformers; results also go to ``output_dir``."""
        from . import lmeval

        if self.tokenizer is None:
            raise AutoRoundError("evaluation needs the model's tokenizer, and none was found with the model")
        model = self.model if folder is None else load_checkpoint(folder)
        return lmeval.run(model, self.tokenizer, options, output_dir, folder=folder, label=folder or "in memory")


def load_checkpoint(folder: str) -> nn.Module:
    """A checkpoint folder (any format this project writes, a GGUF file's folder included) loaded through
    transformers in float32, as a user would load it."""
    from transformers import AutoModelForCausalLM

    gguf_files = sorted(Path(folder).glob("*.gguf"))
    kw: dict[str, Any] = {"gguf_file": gguf_files[0].name} if gguf_files else {}
    config = Path(folder) / "config.json"
    method = None
    if config.is_file():
        method = (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")
    if method in ("gptq", "awq"):
        # transformers would hand GPTQ/AWQ checkpoints to optimum/gptqmodel; this project's loader reads them
        from ..transformers_integration import AutoRoundConfig

        kw["quantization_config"] = AutoRoundConfig()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def name_list(value: Any) -> list[str]:
    """A comma-separated string or a sequence of names as a list (empty names dropped)."""
    if isinstance(value, str):
        return [x for x in value.split(",") if x]
    return list(value or [])
