"""Monkeypatching shared by the PyLate and colpali integrations: swap a library's functions
for ours wherever its loaded modules hold them, and put everything back.

A library spreads a function around at import time: ``from ..scores import colbert_scores``
binds a module attribute, ``def f(score_metric=colbert_kd_scores)`` a default argument, and
objects built before the patch keep the function as an attribute. ``Patcher.swap`` finds all
three (module attributes and the defaults of the module's functions and methods of every
loaded module of the library, and the attributes of the objects it is given and of their
submodules) by identity, records each change and ``Patcher.restore`` undoes them in reverse.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterable
from typing import Any

_MISSING = object()


class Patcher:
    """The record of one library's patch: (owner, attribute, original value) triples."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.changes: list[tuple[Any, str, Any]] = []
        self.originals: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        return bool(self.originals)

    def set(self, owner: Any, name: str, value: Any) -> None:
        """setattr(owner, name, value), remembering what was there (for a class, what its own
        __dict__ held: an inherited attribute is deleted again on restore)."""
        old = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
        self.changes.append((owner, name, old))
        setattr(owner, name, value)

    def modules(self) -> list[types.ModuleType]:
        p = self.package
        return [m for n, m in list(sys.modules.items()) if (n == p or n.startswith(p + ".")) and m is not None]

    def swap(self, mapping: dict[int, Any], objects: Iterable[Any] = ()) -> list[str]:
        """Replace every value whose id is a key of ``mapping`` by mapping[id]: module
        attributes and function defaults in the library's loaded modules, attributes of
        ``objects`` (and of their ``nn.Module`` submodules). Returns what was replaced."""
        done: list[str] = []
        for mod in self.modules():
            for name, val in list(vars(mod).items()):
                if id(val) in mapping:
                    self.set(mod, name, mapping[id(val)])
                    done.append(f"{mod.__name__}.{name}")
                for fn, where in _functions_of(mod, name, val):
                    self._swap_defaults(fn, mapping, f"{where} default", done)
        for obj in objects:
            subs = list(obj.modules()) if hasattr(obj, "modules") and callable(obj.modules) else [obj]
            for sub in subs:
                for name, val in list(getattr(sub, "__dict__", {}).items()):
                    if id(val) in mapping:
                        self.set(sub, name, mapping[id(val)])
                        done.append(f"{type(sub).__name__}.{name}")
        return done

    def _swap_defaults(self, fn, mapping, where, done) -> None:
        defaults = fn.__defaults__
        if defaults and any(id(v) in mapping for v in defaults):
            self.set(fn, "__defaults__", tuple(mapping.get(id(v), v) for v in defaults))
            done.append(where)
        kw = fn.__kwdefaults__
        if kw and any(id(v) in mapping for v in kw.values()):
            self.set(fn, "__kwdefaults__", {k: mapping.get(id(v), v) for k, v in kw.items()})
            done.append(where)

    def restore(self) -> None:
        for owner, name, old in reversed(self.changes):
            if old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)
            else:
                setattr(owner, name, old)
        self.changes.clear()
        self.originals.clear()


def _functions_of(mod: types.ModuleType, name: str, val: Any):
    """Plain functions defined in ``mod``: module-level ones and the methods of its classes."""
    if isinstance(val, types.FunctionType) and val.__module__ == mod.__name__:
        yield val, f"{mod.__name__}.{name}"
    elif isinstance(val, type) and val.__module__ == mod.__name__:
        for attr, member in vars(val).items():
            fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if isinstance(fn, types.FunctionType):
                yield fn, f"{mod.__name__}.{name}.{attr}"
