"""Reading and replacing a ``forward``'s named arguments inside module hooks.

``torch.compile`` traces the hooks of a patched model. ``inspect.Signature.bind`` there breaks
the graph as soon as any dict was mutated before it in the same trace (Dynamo refuses to read the
signature's mappingproxy then), so hooks look arguments up with plain tuple and dict operations
from positions computed once, when the hook is made.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["ArgReader"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ArgReader:
    """The named arguments of calls to ``forward`` (a bound method), by position or keyword."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        parameters = inspect.signature(forward).parameters  # may raise TypeError/ValueError: the caller's to handle
        self.names = frozenset(parameters)
        self._index = {n: i for i, (n, p) in enumerate(parameters.items()) if p.kind in _POSITIONAL}

    def has(self, *names: str) -> bool:
        """Whether ``forward`` takes every one of ``names`` as a named parameter."""
        return all(n in self.names for n in names)

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        """The value ``name`` was given in this call (None if not given)."""
        i = self._index.get(name)
        if i is not None and len(args) > i:
            return args[i]
        return kwargs.get(name)

    def replaced(self, args: tuple, kwargs: dict, **values: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with each of ``values`` set where the call gave it (by keyword if it did not)."""
        kwargs = dict(kwargs)
        for name, value in values.items():
            i = self._index.get(name)
            if i is not None and len(args) > i:
                args = args[:i] + (value,) + args[i + 1:]
            else:
                kwargs[name] = value
        return args, kwargs

    def without(self, args: tuple, kwargs: dict, *names: str) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with ``names`` gone: None where given by position, dropped from the keywords."""
        for name in names:
            i = self._index.get(name)
            if i is not None and len(args) > i:
                args = args[:i] + (None,) + args[i + 1:]
        return args, {k: v for k, v in kwargs.items() if k not in names}
