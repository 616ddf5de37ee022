"""The one place that chooses which implementation of an op runs: one ordered table per op.

Each op (``prefix_attention``, ``lora_linear``, ``adapter``, ``singular_values``) has a
:class:`Table` of :class:`Impl` entries. An entry's ``applies(call)`` returns ``None`` when it can
run the call and otherwise the reason it declines; under ``backend="auto"`` the first entry that
applies wins (entries marked ``auto=False`` run only when asked for by name). The last entry of
every table is ``"torch"``, the reference: plain torch ops, always applicable, the specification
the others are tested against.

A name asked for with ``backend=<name>`` or :func:`use_backend` runs that entry or raises
:class:`BackendUnsupported` (a ``ValueError``) with its reason; :func:`explain` says which entry a
call would take and why each other one declined. The conditions read tensor metadata and the plain
facts of :mod:`.availability`, so ``torch.compile`` traces a choice as a constant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from ..op_names import IMPLEMENTATIONS

__all__ = ["BackendUnsupported", "Impl", "Table", "Explanation", "use_backend", "forced_backend", "explain",
           "register", "backend_names", "backend_for", "first_reason"]


def first_reason(*checks: tuple[bool, str]) -> Optional[str]:
    """The reason of the first ``(failed, reason)`` pair that failed, else None: how an
    ``applies`` condition lists what it needs, in order."""
    for failed, reason in checks:
        if failed:
            return reason
    return None


class BackendUnsupported(ValueError):
    """The implementation asked for by name cannot run these arguments (the message says why and what can)."""


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``applies(call) -> None | reason``.

    ``auto``: eligible for ``backend="auto"`` (True), never (False: only when asked for by name),
    only on the listed device types (the call record's ``device``), or as a callable
    ``auto(call) -> None | reason``.
    """

    name: str
    applies: Callable[[Any], Optional[str]]
    auto: "bool | tuple[str, ...] | Callable[[Any], Optional[str]]" = True
    summary: str = ""

    def auto_reason(self, call: Any) -> Optional[str]:
        """Why ``"auto"`` skips this entry for ``call`` (None: it does not)."""
        if self.auto is True:
            return None
        if self.auto is False:
            return "runs only when asked for by name"
        if callable(self.auto):
            return self.auto(call)
        device = getattr(call, "device", None)
        return None if device in self.auto else f"'auto' runs it only on {'/'.join(self.auto)}"


@dataclass
class Explanation:
    """Which implementation runs a call (``chosen``) and why each other one declined (``declined``)."""

    op: str
    requested: str
    chosen: str
    declined: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        head = f"{self.chosen} runs" if self.chosen != "none" else "nothing runs: the implementation asked for declines"
        lines = [f"{self.op}: {head} (backend={self.requested!r})"]
        lines += [f"  {name}: {reason}" for name, reason in self.declined.items()]
        return "\n".join(lines)


_forced: list[str] = []
_tables: dict[str, tuple["Table", Callable[..., Any]]] = {}


class Table:
    """The ordered implementations of one op (first applicable wins; ``"torch"`` last)."""

    def __init__(self, op: str, impls: list[Impl]):
        names = [i.name for i in impls]
        if names[-1] != "torch" or len(set(names)) != len(names):
            raise ValueError(f"{op}: a table ends with 'torch' and names each implementation once, got {names}")
        unknown = [n for n in names if n not in IMPLEMENTATIONS]
        if unknown:  # the config checks backends against that list without importing the ops
            raise ValueError(f"{op}: implementation name(s) {unknown} are not in ptpeft_fast.op_names.IMPLEMENTATIONS")
        self.op = op
        self.impls = tuple(impls)
        self._by_name = {i.name: i for i in impls}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def requested(self, backend: str) -> str:
        """``backend``, or the name forced by :func:`use_backend` when ``backend`` is ``"auto"`` and this
        table has it; ``ValueError`` for a name the table lacks."""
        if backend not in ("auto", *self._by_name):
            raise ValueError(f"{self.op}: backend={backend!r} is not one of {('auto', *self._by_name)}")
        if backend == "auto" and _forced and _forced[-1] in self._by_name:
            return _forced[-1]
        return backend

    def choose(self, backend: str, call: Any) -> str:
        """The name of the implementation that runs ``call``; :class:`BackendUnsupported` if a named one cannot."""
        requested = self.requested(backend)
        if requested != "auto":
            reason = self._by_name[requested].applies(call)
            if reason is not None:
                raise BackendUnsupported(f"{self.op}: backend={requested!r} cannot run this call: {reason}; "
                                         f"use backend='auto' (or 'torch', the reference)")
            return requested
        for impl in self.impls:
            if impl.auto_reason(call) is None and impl.applies(call) is None:
                return impl.name
        raise AssertionError(f"{self.op}: the 'torch' reference declined a call")  # applies() is constant None

    def explain(self, backend: str, call: Any) -> Explanation:
        requested = self.requested(backend)
        declined = {}
        chosen = None
        for impl in self.impls:
            reason = impl.applies(call)
            if requested != "auto" and impl.name != requested:
                reason = reason or f"not asked for (backend={requested!r})"
            elif requested == "auto" and impl.auto_reason(call) is not None:
                reason = reason or impl.auto_reason(call)
            elif chosen is not None:
                reason = reason or f"applies, but {chosen} comes first"
            if reason is None and chosen is None:
                chosen = impl.name
            else:
                declined[impl.name] = reason or ""
        if chosen is None:  # a named implementation that cannot run (choose() raises): its reason is in declined
            chosen = "none"
        return Explanation(self.op, backend, chosen, declined)


def register(table: Table, make_call: Callable[..., Any]) -> None:
    """Make ``table`` known to :func:`explain`; ``make_call(*args, **kwargs)`` builds the call record
    from the public op's own arguments."""
    _tables[table.op] = (table, make_call)


def backend_names() -> tuple[str, ...]:
    """Every implementation name of every registered op, plus ``"auto"``."""
    names = {"auto"}
    for table, _ in _tables.values():
        names.update(table.names)
    return tuple(sorted(names))


def backend_for(op: str, name: str) -> str:
    """``name`` when ``op``'s table has it, else ``"auto"``: how one backend name for a whole model
    (``PTPeftConfig.backend``) applies to each op."""
    if name != "auto" and name not in backend_names():
        raise ValueError(f"backend {name!r} is not an implementation of any op; choose one of {backend_names()}")
    return name if op in _tables and name in _tables[op][0].names else "auto"


def explain(op: Any, *args: Any, backend: str = "auto", **kwargs: Any) -> Explanation:
    """Which implementation ``op(*args, **kwargs)`` would run, and why the others decline.

    ``op`` is a public op (``ptpeft_fast.ops.prefix_attention``) or its name.
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", str(op))
    if name not in _tables:
        raise ValueError(f"explain: unknown op {name!r}; known: {sorted(_tables)}")
    table, make_call = _tables[name]
    return table.explain(backend, make_call(*args, **kwargs))


def forced_backend() -> Optional[str]:
    """The name forced by the innermost :func:`use_backend` block, or None."""
    return _forced[-1] if _forced else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Inside the block, every op called with ``backend="auto"`` whose table has ``name`` runs that
    implementation (``"torch"``: the reference everywhere); ops without it choose as usual."""
    if name not in backend_names():
        raise ValueError(f"use_backend: {name!r} is not an implementation of any op; choose one of {backend_names()}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
