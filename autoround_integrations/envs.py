"""The one place that reads environment variables.

Every variable is read lazily, at attribute access (``autoround.envs.AR_LOG_LEVEL``), so a value set after
import is honoured.  ``set_config(AR_LOG_LEVEL="DEBUG")`` validates and sets variables for this process and
its children; ``is_set(name)`` says whether the user set one explicitly.  An invalid value raises a
``ValueError`` that names the variable and its valid values.  No other module of the project reads
``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected one of " + ", ".join(repr(v) for v in _TRUE + _FALSE[:-1]))


def _log_level(raw: str) -> str:
    up = raw.strip().upper()
    if up not in _LOG_LEVELS:
        raise ValueError("expected one of " + ", ".join(_LOG_LEVELS))
    return up


def _positive_float(raw: str) -> float:
    try:
        val = float(raw)
    except ValueError:
        raise ValueError("expected a positive number") from None
    if not val > 0:
        raise ValueError("expected a positive number")
    return val


def _positive_int(raw: str) -> int:
    try:
        val = int(raw)
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if val <= 0:
        raise ValueError("expected a positive integer")
    return val


def _nonneg_int(raw: str) -> int:
    try:
        val = int(raw)
    except ValueError:
        raise ValueError("expected a non-negative integer") from None
    if val < 0:
        raise ValueError("expected a non-negative integer")
    return val


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected a non-empty value")
    return raw.strip()


def _path(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected a non-empty path")
    return os.path.expanduser(raw)


@dataclass(frozen=True)
class _Var:
    parse: Callable[[str], Any]
    default: Any
    doc: str
    # set for a variable of the reference tool whose feature does not exist here: a value other than the default
    # is refused (``check_unsupported``) with this reason
    unsupported: str | None = None


_VARS: dict[str, _Var] = {
    "AR_LOG_LEVEL": _Var(_log_level, "INFO", "log level of the 'autoround' logger"),
    "AR_WORK_SPACE": _Var(_path, "ar_work_space",
                          "folder for temporary offloaded tensors: the block loop's cached activations when they "
                          "would not fit in memory (a subfolder per run, removed at its end)"),
    "AR_USE_MODELSCOPE": _Var(_bool, False, "load hub models and datasets from ModelScope instead of Hugging Face",
                              unsupported="only the Hugging Face hub and local files are read"),
    "AR_DISABLE_OFFLOAD": _Var(_bool, False,
                               "keep the block loop's cached activations in memory even when they would not fit "
                               "(by default they go to files under AR_WORK_SPACE then)"),
    "AR_DISABLE_DATASET_SUBPROCESS": _Var(_bool, False, "tokenize calibration data in the main process"),
    "AR_ACT_SCALE": _Var(_positive_float, 1.0,
                         "multiplier on the calibrated activation ranges (static scales such as FP8_STATIC's, "
                         "NVFP4's activation global scale); a run whose activation scales are all dynamic refuses it"),
    "AR_ENABLE_ACT_MINMAX_TUNING": _Var(
        _bool, False, "SignRound also tunes a clip ratio on dynamic activation scales (static ones are tuned by "
                      "default), and on the min of asymmetric ones; research only: the ratios act in memory, and no "
                      "checkpoint format can carry them, so an export refuses them"),
    "AR_ENABLE_UNIFY_MOE_INPUT_SCALE": _Var(
        _bool, False, "MoE: every expert's input projections (gate/up) with static activation scales take the "
                      "largest calibrated amax of their MoE module, so an FP8 dispatch quantizes its input once (experts "
                      "that saw no calibration token take it anyway); a run with no such layer refuses it"),
    "AR_NVFP4_FUSED_LAYER_GLOBAL_SCALE": _Var(
        _bool, True, "NVFP4: layers that engines fuse (q/k/v, gate/up) share one weight global scale, from their "
                     "largest |weight|, as vLLM's fused NVFP4 layers need"),
    "AR_SEARCH_SCALE_RATIO": _Var(
        _positive_float,
        0.7,
        "optimized RTN search: lowest integer range (symmetric, x 2**(bits-1)) or clip ratio (asymmetric) tried",
    ),
    "AR_ENABLE_COMPILE_PACKING": _Var(_bool, False, "torch.compile the packing kernels",
                                      unsupported="packing is not compiled"),
    "AR_DYNAMO_CACHE_SIZE_LIMIT": _Var(_positive_int, 64,
                                       "torch._dynamo cache size limit set when enable_torch_compile compiles"),
    "AR_AUTO_SCHEME_NSAMPLES": _Var(_positive_int, None,
                                    "AutoScheme scoring samples where AutoScheme(nsamples=...) is not given (else 16)"),
    "AR_AUTO_SCHEME_BATCH_SIZE": _Var(_positive_int, None,
                                      "AutoScheme scoring batch size where AutoScheme(batch_size=...) is not given "
                                      "(else 8)"),
    "AR_CACHE_DIR": _Var(_path, os.path.join("~", ".cache", "autoround"), "cache for converted models and corpora"),
    "AR_DIST_TIMEOUT": _Var(_positive_float, 1800.0,
                            "torch.distributed: seconds a rank waits in a collective for the others before it stops "
                            "with an error"),
    # set by the launcher (torchrun): a run with WORLD_SIZE > 1 splits its calibration samples across the ranks
    "WORLD_SIZE": _Var(_positive_int, None, "torchrun: number of processes of the run"),
    "RANK": _Var(_nonneg_int, None, "torchrun: this process's rank"),
    "LOCAL_RANK": _Var(_nonneg_int, None, "torchrun: this process's rank on its machine (its GPU index)"),
    "MASTER_ADDR": _Var(_text, None, "torchrun: address of rank 0's rendezvous"),
    "MASTER_PORT": _Var(_positive_int, None, "torchrun: port of rank 0's rendezvous"),
}


def _describe(name: str) -> str:
    var = _VARS[name]
    if var.parse is _bool:
        return "a boolean (1/0, true/false, yes/no, on/off)"
    if var.parse is _log_level:
        return "one of " + ", ".join(_LOG_LEVELS)
    if var.parse is _positive_float:
        return "a positive number"
    if var.parse is _positive_int:
        return "a positive integer"
    if var.parse is _nonneg_int:
        return "a non-negative integer"
    if var.parse is _text:
        return "a non-empty value"
    return "a non-empty path"


def _check_name(name: str) -> None:
    if name not in _VARS:
        raise ValueError(f"unknown autoround environment variable {name!r}; known: {', '.join(sorted(_VARS))}")


def _default(var: _Var) -> Any:
    return os.path.expanduser(var.default) if var.parse is _path else var.default


def _read(name: str) -> Any:
    var = _VARS[name]
    raw = os.environ.get(name)
    if raw is None:
        return _default(var)
    try:
        return var.parse(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: it must be {_describe(name)}") from None


def __getattr__(name: str) -> Any:
    if name in _VARS:
        return _read(name)
    raise AttributeError(f"module 'autoround.envs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_VARS))


def is_set(name: str) -> bool:
    """True when the user set ``name`` in the environment (even to its default value)."""
    _check_name(name)
    return name in os.environ


def set_config(**values: Any) -> None:
    """Validate and set variables, e.g. ``set_config(AR_LOG_LEVEL="DEBUG", AR_DISABLE_OFFLOAD=True)``.

    ``None`` unsets a variable (back to its default).  All values are checked before any is set.
    """
    staged = _staged(values)
    for name, raw in staged.items():
        if raw is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = raw
    if "AR_LOG_LEVEL" in staged:
        from .log import apply_level

        apply_level()


def child_environment(**values: Any) -> dict[str, str]:
    """This process's environment with ``values`` set (checked as ``set_config`` checks them; ``None`` unsets),
    for a subprocess; this process's own environment is left alone."""
    env = dict(os.environ)
    for name, raw in _staged(values).items():
        if raw is None:
            env.pop(name, None)
        else:
            env[name] = raw
    return env


def _staged(values: dict[str, Any]) -> dict[str, str | None]:
    staged: dict[str, str | None] = {}
    for name, value in values.items():
        _check_name(name)
        if value is None:
            staged[name] = None
            continue
        raw = ("1" if value else "0") if isinstance(value, bool) else str(value)
        try:
            _VARS[name].parse(raw)
        except ValueError:
            raise ValueError(f"{name}={value!r} is invalid: it must be {_describe(name)}") from None
        staged[name] = raw
    return staged


def check_unsupported() -> None:
    """Refuse (``ValueError``) an invalid value of any variable that is set, and every variable of a feature that
    does not exist here set to a non-default value: before any work, instead of when a stage reads it."""
    for name in _VARS:
        if name in os.environ:
            _read(name)
    bad = []
    for name, var in _VARS.items():
        if var.unsupported is None or name not in os.environ:
            continue
        if _read(name) != _default(var):
            bad.append(f"{name}={os.environ[name]!r} ({var.unsupported})")
    if bad:
        raise ValueError(
            "environment variable(s) of features this version does not have: " + "; ".join(bad)
            + ". Unset them (or set their defaults) to continue"
        )


def describe_all() -> dict[str, str]:
    """name -> one-line description with its default, for ``auto-round -h``."""
    out = {}
    for name, var in _VARS.items():
        note = f"; not supported: {var.unsupported}, only the default is accepted" if var.unsupported else ""
        out[name] = f"{var.doc} (default {var.default!r}{note})"
    return out

