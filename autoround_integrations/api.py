"""The user's entry point: ``AutoRound(model, scheme=..., ...).quantize_and_save(output_dir, format=...)``.

Parameter names and defaults follow the reference tool so its documented snippets work unchanged.  The work is
``quantizer/pipeline.py``'s (the stages and their order); ``AutoRound`` builds the typed options and forwards
to it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from autoround.quantizer.autoscheme import AutoScheme  # noqa: F401  (public: autoround.AutoScheme)
from autoround.quantizer.errors import AutoRoundError
from autoround.quantizer.options import apply_model_free, build_options, check_unsupported
from autoround.quantizer.pipeline import Pipeline, RunOptions

from . import envs

__all__ = ["AutoRound", "AutoScheme"]


class AutoRound:
    """Quantize a causal language model's linear layers to low-bit integers and export a checkpoint.

    The run's state (``model``, ``tokenizer``, ``scheme``, ``plan``, ``layers``, ``quantized``, ...) is the
    pipeline's (``ar.pipeline``), read and written through this object."""

    def __init__(self, model: Any, tokenizer: Any = None, **options: Any) -> None:
        """``model``: a local folder, a hub id, a .gguf file or a loaded model; ``tokenizer``: optional.

        Every other keyword is an option of ``quantizer/options.py`` (the reference tool's names and defaults,
        e.g. ``scheme``, ``bits``, ``group_size``, ``sym``, ``iters``, ``lr``, ``nsamples``, ``seqlen``,
        ``batch_size``, ``dataset``, ``device_map``, ``seed``, ``disable_opt_rtn``); an unknown keyword is a
        ``TypeError`` listing the valid ones, a bad value an ``AutoRoundError`` before any work."""
        try:
            plan, calib, tuning, runtime = build_options(apply_model_free(options))
            check_unsupported(plan, tuning)
            envs.check_unsupported()
        except ValueError as exc:
            raise AutoRoundError(str(exc)) from None
        object.__setattr__(self, "pipeline", Pipeline(RunOptions(plan, calib, tuning, runtime), model, tokenizer))

    plan_options = property(lambda self: self.pipeline.options.plan)
    calibration_options = property(lambda self: self.pipeline.options.calibration)
    tuning_options = property(lambda self: self.pipeline.options.tuning)
    runtime_options = property(lambda self: self.pipeline.options.runtime)
    device_map = property(lambda self: self.pipeline.options.runtime.device_map)

    def __getattr__(self, name: str) -> Any:
        # only reached for names this object does not have: the run's state, kept by the pipeline
        if name == "pipeline" or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(self.pipeline, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"{name} is read-only: pass it to AutoRound(...) instead")
        setattr(self.pipeline, name, value)

    def quantize(self, formats: "str | list | None" = None) -> tuple[Any, dict[str, Any]]:
        """Quantize in memory (weights become their fake-quantized values); returns (model, layer_config)."""
        return self.pipeline.quantize(formats)

    def save_quantized(self, output_dir: str | os.PathLike, format: str | None = None, inplace: bool = True) -> list[str]:
        """Write one checkpoint per format (comma-separated); with several formats, one subfolder each.  Without a
        format: auto_round, or where it cannot hold the scheme the format named after it (GGUF:Q4_K_M ->
        gguf:q4_k_m), as the reference does."""
        _check_inplace(inplace)
        return self.pipeline.export(output_dir, format)

    def quantize_and_save(
        self,
        output_dir: str | os.PathLike = "tmp_autoround",
        format: str | None = None,
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
        return self.pipeline.run(output_dir, format, resume)


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
