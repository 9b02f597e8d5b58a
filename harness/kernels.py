"""Which :class:`~quantizers.qlinear.QuantLinear` backend (``kernel=...``) a run's packed linears use.

Backends live in ``quantizers.qlinear.BACKENDS``: ``torch`` always; fused kernels register
themselves when their module (under ``quantizers/kernels/``) is imported, which
:func:`load_backends` does on demand. ``auto`` picks the fused ``triton`` kernel on a GPU when it is
registered and Triton imports, else ``torch``. The choice is a speed knob: it does not enter the
config hash, but the record names it (``data.kernel``) and the paths that ran (``data.kernel_paths``).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

import torch
from torch import nn

from harness.errors import UserError
from quantizers.qlinear import BACKENDS, QuantLinear

AUTO = "auto"
FUSED = "triton"  # the fused GPU kernel that ``auto`` prefers


def load_backends() -> dict[str, str]:
    """Import ``quantizers.kernels`` and its modules so that their backends register.

    Returns ``{module: reason}`` for each one that could not be imported (e.g. Triton missing);
    empty when all loaded or when there is no kernels package."""
    failed: dict[str, str] = {}
    try:
        pkg = importlib.import_module("quantizers.kernels")
    except ModuleNotFoundError as exc:
        if exc.name == "quantizers.kernels":
            return failed
        return {"quantizers.kernels": str(exc)}
    except ImportError as exc:
        return {"quantizers.kernels": str(exc)}
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        name = f"{pkg.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed[name] = str(exc)
    return failed


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def validate_kernel(name: str) -> None:
    """Raise :class:`UserError` (key ``kernel``) unless ``name`` is ``auto`` or a registered backend."""
    if name == AUTO or name in BACKENDS:
        return
    failed = load_backends()  # only now: importing kernels pulls in Triton, seconds a run need not pay
    if name in BACKENDS:
        return
    choices = [AUTO, *BACKENDS]
    known = list(dict.fromkeys([*choices, FUSED]))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if name == FUSED or (close and close[0] not in choices):  # a real kernel, just not available here
        why = "; ".join(f"{m}: {r}" for m, r in failed.items()) or "no backend registered under that name"
        hint = f"did you mean {close[0]!r}? " if name != FUSED else ""
        raise UserError("kernel", f"{hint}the {FUSED} kernel is not available here ({why})",
                        f"use one of {', '.join(choices)}")
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError("kernel", f"unknown kernel {name!r}", f"{hint}use one of {', '.join(choices)}")


def resolve_kernel(name: str, device: torch.device) -> str:
    """``auto`` → ``triton`` on CUDA when registered and Triton imports, else ``torch``; other names as given."""
    if name != AUTO:
        return name
    if device.type != "cuda":
        return "torch"
    load_backends()
    return FUSED if FUSED in BACKENDS and _triton_imports() else "torch"


def set_kernel(model: nn.Module, name: str) -> int:
    """Point every QuantLinear of ``model`` at backend ``name``; returns how many were set."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.backend = name
            n += 1
    return n
