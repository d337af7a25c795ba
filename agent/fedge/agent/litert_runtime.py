"""Finds a TFLite interpreter on the device: ``ai_edge_litert`` first, ``tflite_runtime`` second.

Boards whose Python or libc has no LiteRT wheel can still run fedge with the older
tflite-runtime 2.14 (which needs ``numpy<2``); both run fedge models identically.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from fedge.protocol.errors import FedgeError

RuntimeName = Literal["auto", "ai_edge_litert", "tflite_runtime"]
_CANDIDATES = ("ai_edge_litert", "tflite_runtime")


class RuntimeUnavailableError(FedgeError):
    """Neither LiteRT nor tflite-runtime can be imported."""


@dataclass(frozen=True)
class LiteRTRuntime:
    """The interpreter class found, and which package it came from (for status and logs)."""

    name: str
    interpreter_class: Any


def find_runtime(preferred: RuntimeName = "auto") -> LiteRTRuntime:
    """Imports the preferred runtime, or the first that imports when ``auto``."""
    candidates = _CANDIDATES if preferred == "auto" else (preferred,)
    errors: list[str] = []
    for name in candidates:
        try:
            module = importlib.import_module(f"{name}.interpreter")
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        return LiteRTRuntime(name, module.Interpreter)
    raise RuntimeUnavailableError(
        "no TFLite runtime: install 'ai-edge-litert' (or 'tflite-runtime' with numpy<2); " + "; ".join(errors)
    )
