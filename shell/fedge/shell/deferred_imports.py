"""Standard-library modules a device agent would import only because a dependency does, loaded on
first use instead (issue 18: device memory).

paho-mqtt 2.x imports ``urllib.request`` at import time, and with it ``http.client`` and
``email`` (23 modules an agent has no other use for, ~1.5 MiB of its memory), for one call,
``getproxies()``, that it makes only when PySocks is installed (fedge does not depend on it).
:func:`defer_until_used` puts a stand-in module in ``sys.modules`` before paho is imported:
``import urllib.request`` still works everywhere, and the first use of any of its attributes
imports the real module, which then replaces the stand-in (``requests``, which an agent loads
only to reach EdgeX core-data, does that at once, so such an agent loads it as before).

Not :class:`importlib.util.LazyLoader`: on Python 3.11 a second ``import`` of a lazy module
reads its ``__spec__`` and so loads it at once; the stand-in carries the real ``__spec__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

#: What ``fedge agent run`` defers (:func:`fedge.cli.prepare_agent_process`).
AGENT_DEFERRED = ("urllib.request",)

_LOAD_LOCK = threading.Lock()


class _StandIn(types.ModuleType):
    """In ``sys.modules`` until the module is used: any attribute it lacks (all of the real
    module's) imports the real module and comes from it."""

    def __getattr__(self, attribute: str) -> object:
        return getattr(_load(self), attribute)


def _load(stand_in: _StandIn) -> types.ModuleType:
    name = stand_in.__name__
    with _LOAD_LOCK:
        current = sys.modules.get(name)
        if current is not stand_in and current is not None:
            return current  # loaded already (by another thread, or imported anew)
        sys.modules.pop(name, None)
        try:
            return importlib.import_module(name)  # sets the parent package's attribute too
        except BaseException:
            sys.modules[name] = stand_in
            raise


def defer_until_used(name: str) -> bool:
    """Makes ``import name`` cheap until the module is used; False when it is loaded already or
    cannot be found (then a later import behaves as it would have)."""
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    stand_in = _StandIn(name)
    stand_in.__spec__ = spec
    stand_in.__loader__ = spec.loader
    stand_in.__package__ = spec.parent
    sys.modules[name] = stand_in
    parent, _, child = name.rpartition(".")
    if parent:  # what the import system sets after loading a submodule
        setattr(sys.modules[parent], child, stand_in)
    return True
