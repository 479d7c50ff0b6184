"""The transform stage: model rewrites that run after load and before plan (rotations such as Hadamard go here).

A transform is one ``Transform`` subclass in a module of this package; the pipeline applies the run's
transforms in order, each once, before any layer is planned or calibration data is drawn."""

from __future__ import annotations

from torch import nn


class Transform:
    """One model rewrite.  ``apply`` changes ``model`` in place so that its float outputs are unchanged (or
    changed as the transform documents); ``linears`` (name -> module) are the layers the plan will see, and a
    transform that replaces modules returns the new mapping."""

    name = "transform"

    def apply(self, model: nn.Module, linears: dict[str, nn.Module], block_names: list[str]) -> dict[str, nn.Module]:
        raise NotImplementedError(f"transform {self.name!r} does not implement apply()")

    def settle(self, model: nn.Module, quantized: set[str]) -> None:
        """Called once the plan is made (``quantized``: the layers that will be quantized), before calibration."""

    def format_error(self, fmt) -> str | None:
        """Why export format ``fmt`` cannot write a model this transform rewrote, or None."""
        return None

