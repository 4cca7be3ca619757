"""Small name -> factory registries (the torchdistill idea), so configs can name components."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from specdistill.errors import SpecdistillError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of factories; ``@REG.register("name")`` adds one, ``REG.get("name")`` finds it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SpecdistillError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
