"""Thread names the kernel shows (``/proc/<pid>/task/<tid>/comm``, ``top -H``, ``ps -L``).

Python 3.11's ``threading`` names threads for Python only: the kernel sees every thread of an
agent as ``python``, so ``bench/bench_agent_budget.py`` (wake-ups a second by thread) and an
operator with ``top -H`` could not tell the worker from paho's network thread. A thread names
itself by writing ``/proc/thread-self/comm`` (Linux 3.17+; no ``prctl`` through ctypes); the
kernel keeps 15 bytes. Anywhere else, or if the write is refused, nothing happens.
"""

from __future__ import annotations

#: The kernel keeps at most this many bytes of a thread's name.
COMM_BYTES = 15


def name_current_thread(name: str) -> None:
    """Names the calling thread for the kernel (best effort: a name is for people, never needed)."""
    try:
        with open("/proc/thread-self/comm", "wb") as comm:
            comm.write(name.encode("ascii", "replace")[:COMM_BYTES])
    except OSError:
        return
