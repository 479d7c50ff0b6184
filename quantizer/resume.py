"""Resume state of an interrupted SignRound run: the tuned weights of every finished block.

The state lives in a hidden sibling of the output folder (``<parent>/.<name>.autoround-resume``), never in
the output folder itself, so an interrupted run cannot damage a checkpoint already there.  Each finished block
is one safetensors file written to a temporary name and renamed; ``state.json`` (also renamed into place)
lists the finished blocks and a fingerprint of everything that determines the result (model, schemes,
calibration tokens, tuning options).  Resuming with different settings is refused with the differences named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from . import dtypes
from .errors import AutoRoundError

STATE_FILE = "state.json"
_VERSION = 3  # 2: every packed weight stored through its weight family; 3: and the activation clip ratios


def resume_dir_for(output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir).expanduser().resolve()
    return out.parent / f".{out.name}.autoround-resume"


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


_DIGEST_CHUNKS, _DIGEST_CHUNK = 16, 64  # per tensor: 16 runs of 64 consecutive values


def model_digest(model: torch.nn.Module, read: "Callable[[str], torch.Tensor] | None" = None) -> str:
    """A cheap fingerprint of a model's float weights: names, shapes, dtypes and 16 short runs of consecutive
    values spread over every tensor.  Runs, not a fine stride: a weight mapped from the checkpoint file is read
    page by page, and a strided sample would bring every page of the model into memory before tuning starts.
    ``read``: where a tensor on the meta device is read from (streamed tuning's source files)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        if p.is_meta and read is not None:  # streamed tuning: a block not read in yet, read from the source
            p = read(name)
        flat = p.detach().reshape(-1)
        n = flat.numel()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if n <= _DIGEST_CHUNKS * _DIGEST_CHUNK:
            runs = [flat]
        else:
            step = (n - _DIGEST_CHUNK) // (_DIGEST_CHUNKS - 1)
            runs = [flat[i * step : i * step + _DIGEST_CHUNK] for i in range(_DIGEST_CHUNKS)]
        for run in runs:
            h.update(run.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ResumeStore:
    """Finished blocks of one run, keyed by block name."""

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = {k: _jsonable(v) for k, v in fingerprint.items()}
        self.finished: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: Mapping[str, Any], resume: bool, log: Any) -> "ResumeStore":
        """With ``resume``, load a matching state (refusing a mismatched one); without, start afresh."""
        store = cls(path, fingerprint)
        state_file = store.path / STATE_FILE
        if state_file.exists() and resume:
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError) as exc:
                raise AutoRoundError(
                    f"cannot read the resume state {state_file} ({exc}); delete {store.path} to start over"
                ) from None
            if state.get("version") != _VERSION:
                raise AutoRoundError(f"resume state {store.path} has another version; delete it to start over")
            diff = {
                k: (state["fingerprint"].get(k), v)
                for k, v in store.fingerprint.items()
                if state["fingerprint"].get(k) != v
            }
            if diff:
                lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise AutoRoundError(
                    f"cannot resume from {store.path}: it was made with other settings ({lines}). Run with the "
                    "same settings, or without --resume to start over"
                )
            store.finished = [b for b in state["finished"] if (store.path / _block_file(b)).exists()]
            log.info("resuming: %d block(s) already tuned in %s", len(store.finished), store.path)
            return store
        if resume:
            log.warning("--resume: no saved state at %s; starting from the first block", store.path)
        elif state_file.exists():
            log.warning("discarding the state of an earlier interrupted run at %s (pass --resume to continue it)", store.path)
        if store.path.exists():
            shutil.rmtree(store.path)
        store.path.mkdir(parents=True)
        store._write_state()
        return store

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- blocks -------------------------------------------------------------------------------------
    def has(self, block_name: str) -> bool:
        return block_name in self.finished

    def save_block(self, block_name: str, weights: Mapping[str, Any], losses: tuple[float, float],
                   act_ratios: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Store a finished block's packed weights (``rel name -> packed weight`` of any weight family) and its
        layers' tuned activation clip ratios."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {}
        for rel, qw in weights.items():
            family = dtypes.family_of_weight(qw)
            parts, fields = family.weight_state(qw)
            tensors.update({f"{rel}.{k}": t for k, t in parts.items()})
            meta[f"{rel}.meta"] = json.dumps({"family": family.name, "tensors": sorted(parts), "fields": fields})
        meta["losses"] = json.dumps(list(losses))
        meta["act_ratios"] = json.dumps({k: list(v) for k, v in (act_ratios or {}).items()})
        target = self.path / _block_file(block_name)
        tmp = target.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)
        self.finished.append(block_name)
        self._write_state()

    def load_block(
        self, block_name: str
    ) -> tuple[dict[str, Any], tuple[float, float], dict[str, tuple[float, float]]]:
        from safetensors import safe_open

        file = self.path / _block_file(block_name)
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        out = {}
        for key, val in meta.items():
            if not key.endswith(".meta"):
                continue
            rel = key[: -len(".meta")]
            entry = json.loads(val)
            family = dtypes.families().get(entry["family"])
            if family is None:
                raise AutoRoundError(
                    f"resume state {self.path} holds weights of the weight family {entry['family']!r}, which is "
                    "not registered now; register it or delete the state to start over"
                )
            parts = {k: tensors[f"{rel}.{k}"] for k in entry["tensors"]}
            out[rel] = family.weight_from_state(parts, entry["fields"])
        a, b = json.loads(meta["losses"])
        ratios = {k: (float(v[0]), float(v[1])) for k, v in json.loads(meta["act_ratios"]).items()}
        return out, (a, b), ratios

    def _write_state(self) -> None:
        state = {"version": _VERSION, "fingerprint": self.fingerprint, "finished": self.finished}
        tmp = self.path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.path / STATE_FILE)


def _block_file(block_name: str) -> str:
    return f"block-{block_name}.safetensors"


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))
