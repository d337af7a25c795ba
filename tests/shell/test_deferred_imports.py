"""defer_until_used: a module in sys.modules that imports itself on first use, once, from any
thread, and stays deferred (to retry) when that import fails."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.shell.deferred_imports import defer_until_used

_MODULE = """
import pathlib, time
runs = pathlib.Path({log!r})
runs.write_text(runs.read_text() + "x") if runs.exists() else runs.write_text("x")
if pathlib.Path({fail!r}).exists():
    raise RuntimeError("cannot load")
time.sleep(0.2)  # a slow import: the threads below all arrive while it runs
VALUE = 42
"""


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n.startswith("fedge_deferred_probe")]:
        del sys.modules[name]


def _write(module_dir: Path, name: str) -> tuple[Path, Path]:
    log, fail = module_dir / f"{name}.runs", module_dir / f"{name}.fail"
    (module_dir / f"{name}.py").write_text(_MODULE.format(log=str(log), fail=str(fail)), encoding="utf-8")
    return log, fail


def test_a_deferred_module_runs_once_on_first_use_from_many_threads(module_dir: Path) -> None:
    log, _ = _write(module_dir, "fedge_deferred_probe_a")
    assert defer_until_used("fedge_deferred_probe_a")
    import fedge_deferred_probe_a  # type: ignore[import-not-found]  # the stand-in: nothing runs

    assert not log.exists()
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(fedge_deferred_probe_a.VALUE)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert got == [42] * 8
    assert log.read_text() == "x"  # ran once
    assert type(sys.modules["fedge_deferred_probe_a"]).__name__ == "module"
    assert not defer_until_used("fedge_deferred_probe_a")  # loaded: nothing to defer


def test_a_failed_first_use_raises_and_the_next_use_tries_again(module_dir: Path) -> None:
    log, fail = _write(module_dir, "fedge_deferred_probe_b")
    fail.touch()
    assert defer_until_used("fedge_deferred_probe_b")
    import fedge_deferred_probe_b  # type: ignore[import-not-found]

    with pytest.raises(RuntimeError, match="cannot load"):
        _ = fedge_deferred_probe_b.VALUE
    assert type(sys.modules["fedge_deferred_probe_b"]).__name__ == "_StandIn"
    fail.unlink()
    assert fedge_deferred_probe_b.VALUE == 42
    assert log.read_text() == "xx"


def test_a_missing_module_is_not_deferred() -> None:
    assert not defer_until_used("fedge_deferred_probe_missing")
    assert "fedge_deferred_probe_missing" not in sys.modules
    assert not defer_until_used("json")  # loaded already
