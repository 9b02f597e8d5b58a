"""Quantization algorithms as pure tensor code.

Every method exposes ``quantize(W, H, config) -> QuantResult`` where ``W`` is an
``(out_features, in_features)`` weight and ``H`` an ``(in_features, in_features)``
Hessian proxy (``2/n · X Xᵀ``) or ``None`` for data-free methods.  Methods are looked up by
name in :data:`QUANTIZERS`; nothing here imports the harness, prints or touches globals.
"""
from __future__ import annotations

from quantizers.base import QuantConfigError, QuantResult
from quantizers.registry import QUANTIZERS, Registry

__all__ = ["QUANTIZERS", "QuantConfigError", "QuantResult", "Registry", "get"]


def get(name: str):
    """Return the registered :class:`~quantizers.registry.Method` called ``name``."""
    _load_builtin()
    return QUANTIZERS.get(name)


def _load_builtin() -> None:
    # Importing the modules registers them; done lazily so `import quantizers` stays cheap.
    import quantizers.rtn  # noqa: F401

    for mod in ("quantizers.gptq", "quantizers.obq"):
        try:
            __import__(mod)
        except ModuleNotFoundError as exc:  # a method not written yet is simply absent
            if exc.name != mod:
                raise
