"""CPU placement for the benchmarks' two views, so that one machine can stand in for several nodes.

* **node-emulated**: each worker process pinned to its own core set (``--cpus verifier=0 --cpus drafter=1``),
  one torch thread per core. Redis, the controller and the benchmark's own client go on the drafter's
  cores: the verifier's cores stand for the verifier node and hold nothing else. The baselines run on the
  verifier's cores alone, so the table answers "does adding a drafter node pay?".
* **equal compute**: the baselines get every core the deployment uses, one thread per core.

Pinning uses ``os.sched_setaffinity``. Linux keeps an affinity per thread, and a new thread inherits its
creator's (so does a program started with ``exec``): a child is pinned before it runs anything
(:func:`pinned_command`) and a running process thread by thread (:func:`pin_threads`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from cosine.errors import InvalidParameterError

NODE, EQUAL = "node-emulated", "equal compute"
ROLES = ("verifier", "drafter")

Layout = dict[str, frozenset[int]]  # role -> cores
_CPU_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def allowed_cpus(pid: int = 0) -> frozenset[int]:
    """The cores ``pid`` (0: this thread) may run on."""
    return frozenset(os.sched_getaffinity(pid))


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0"``, ``"0-3"``, ``"0,2,4-5"`` -> the set of cores."""
    parts = [_CPU_RANGE.fullmatch(part.strip()) for part in text.split(",")]
    if not all(parts) or any(int(m[1]) > int(m[2] or m[1]) for m in parts):  # type: ignore[index]
        raise InvalidParameterError("cpus", f"not a CPU list: {text!r} (e.g. 0, 0-3, 0,2)")
    return frozenset(c for m in parts for c in range(int(m[1]), int(m[2] or m[1]) + 1))  # type: ignore[index]


def format_cpus(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpu_list`, with ranges: ``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def default_layout() -> Layout | None:
    """The verifier on the first core this process may use, the drafter on the second (the issue's two-node
    setting); None on a single core."""
    cpus = sorted(allowed_cpus())
    return {"verifier": frozenset(cpus[:1]), "drafter": frozenset(cpus[1:2])} if len(cpus) >= 2 else None


def parse_layout(items: Iterable[str]) -> Layout | None:
    """``("verifier=0", "drafter=1-3")`` -> a layout; ``()`` -> :func:`default_layout`; ``("none",)`` -> None
    (nothing pinned: the equal-compute view only)."""
    items = list(items)
    if not items:
        return default_layout()
    if items == ["none"]:
        return None
    layout: Layout = {}
    for item in items:
        role, sep, cpus = item.partition("=")
        if not sep or role not in ROLES:
            raise InvalidParameterError("cpus", f"{item!r}: expected ROLE=CPUS with ROLE one of {ROLES}, or none")
        layout[role] = parse_cpu_list(cpus)
    missing = [r for r in ROLES if r not in layout]
    if missing:
        raise InvalidParameterError("cpus", f"no cores given for {missing}")
    if layout["verifier"] & layout["drafter"]:
        raise InvalidParameterError("cpus", "the verifier's and the drafter's cores must not overlap")
    outside = (layout["verifier"] | layout["drafter"]) - allowed_cpus()
    if outside:
        raise InvalidParameterError("cpus", f"cores {format_cpus(outside)} are not available to this process")
    return layout


def view_cpus(layout: Layout | None, view: str) -> frozenset[int]:
    """The cores a baseline gets in ``view``: the verifier's (node-emulated), or every core the deployment
    uses (equal compute; every core this process may use when nothing is pinned)."""
    if layout is None:
        if view == NODE:
            raise InvalidParameterError("view", "the node-emulated view needs a CPU layout")
        return allowed_cpus()
    return layout["verifier"] if view == NODE else layout["verifier"] | layout["drafter"]


def views(layout: Layout | None) -> tuple[str, ...]:
    return (NODE, EQUAL) if layout else (EQUAL,)


_PIN_EXEC = ("import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
             "os.execv(sys.argv[2], sys.argv[2:])")


def pinned_command(cmd: list[str], cpus: Iterable[int]) -> list[str]:
    """``cmd`` started pinned to ``cpus``: a short interpreter pins itself, then becomes ``cmd`` (same pid),
    whose every thread inherits the pinning (no ``preexec_fn``, which is unsafe in a threaded parent, and no
    ``taskset``, which a slim image may lack). ``cmd[0]`` must be a path."""
    return [sys.executable, "-c", _PIN_EXEC, ",".join(str(c) for c in sorted(cpus)), *cmd]


def pin_threads(pid: int, cpus: Iterable[int]) -> None:
    """Pin every thread a running process has now (threads it creates later inherit their creator's)."""
    cpus = set(cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


@contextmanager
def pinned(cpus: Iterable[int], threads: int | None = None) -> Iterator[None]:
    """Run this process on ``cpus`` with ``threads`` torch threads (default: one per core), then restore both."""
    import torch

    cpus = frozenset(cpus)
    before, before_threads = allowed_cpus(), torch.get_num_threads()
    pin_threads(os.getpid(), cpus)
    torch.set_num_threads(threads or len(cpus))
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        pin_threads(os.getpid(), before)
