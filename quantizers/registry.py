"""A small name → object registry with clear errors (duplicate names, "did you mean")."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate name; the message is meant for the user."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to objects. ``kind`` names what is registered, for messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self._items))
            raise RegistryError(f"unknown {self.kind} {name!r}{hint} (known: {known})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


@dataclass(frozen=True)
class Method:
    """A quantization method: its config dataclass and its ``quantize(W, H, cfg)`` function.

    ``needs_hessian`` tells the pipeline whether calibration statistics must be collected.
    ``estimate``, when given, predicts the cost before a run: ``estimate(shapes, device_kind)`` with
    ``shapes`` the (out, in) of every linear, returning a dict with at least ``seconds`` and
    ``peak_bytes``.
    ``shared``, when given, solves several weights that share one ``H`` (the linears fed by the same
    input, e.g. q/k/v) as one problem: ``shared(Ws, H, cfg) -> [QuantResult]``, each result as
    ``quantize(W, H, cfg)`` would return it (rows are independent).
    ``plain``, when given, is the reference solver ``plain(W, H, cfg)`` that the pipeline's plain path
    runs instead of ``quantize`` (the same result by plainer means, e.g. GPTQ's torch column loop
    instead of its GPU kernel).
    """

    name: str
    config_cls: type
    quantize: Callable[..., Any]
    needs_hessian: bool
    estimate: Callable[..., dict[str, Any]] | None = None
    shared: Callable[..., list[Any]] | None = None
    plain: Callable[..., Any] | None = None


QUANTIZERS: Registry[Method] = Registry("quantizer")
