"""A small name -> factory registry, used by every package (timm ``register_model`` style)."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not among the valid ones (a registry entry, a cache's reward); the message lists them."""

    def __str__(self) -> str:  # KeyError would print the repr of its message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to factories. ``kind`` names the thing in error messages ("reward", "LRM")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, *, help: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories and self._factories[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name.")
            self._factories[name] = fn
            doc = (fn.__doc__ or "").strip().splitlines()
            self._help[name] = help or (doc[0] if doc else "")
            return fn

        return deco

    def create(self, name: str, **kwargs: Any) -> T:
        if name not in self._factories:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}. Available: {', '.join(self.list()) or '(none)'}."
            )
        return self._factories[name](**kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._factories if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._factories
