"""Lists a ``.tflite`` model's operators with TensorFlow's own analyzer.

Used to prove a model needs no Flex (Select TF ops) delegate: a Flex op in a device model means
the device would need a TensorFlow-sized runtime, which is exactly what fedge avoids.
"""

from __future__ import annotations

import contextlib
import io
import re

import tensorflow as tf

_OP_RE = re.compile(r"^\s*Op#\d+\s+([A-Za-z0-9_]+)\(", re.MULTILINE)


def analyzer_report(model: bytes) -> str:
    """The text TensorFlow's ``tf.lite.experimental.Analyzer`` prints for the model."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_content=model)
    return out.getvalue()


def list_ops(model: bytes) -> list[str]:
    """Operator names used by every subgraph of the model, in order of appearance."""
    return _OP_RE.findall(analyzer_report(model))


def flex_ops(model: bytes) -> list[str]:
    """The Flex (Select TF) operators in the model: Flex custom ops are named ``Flex<Op>``."""
    report = analyzer_report(model)
    return sorted(set(re.findall(r"\b(Flex[A-Za-z0-9_]+)", report)))
