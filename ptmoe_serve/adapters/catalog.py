"""Every adapter the store serves, by name: what a request's `model` may name, resident or not.

Looking a name up is a dict lookup, and the catalog changes only by the names a look at the
store says changed (manager.py), never by a walk over the store. It keeps its names in order
too, so that the management API pages through millions of them."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from pathlib import Path


class AdapterCatalog:
    def __init__(self):
        self._folders: dict[str, Path] = {}
        self._names: list[str] = []  # sorted

    def __contains__(self, name: object) -> bool:
        return name in self._folders

    def __len__(self) -> int:
        return len(self._folders)

    def folder(self, name: str) -> Path | None:
        return self._folders.get(name)

    def reset(self, folders: Mapping[str, Path]) -> None:
        """Exactly these names, each served from its folder (sorted once)."""
        self._folders = dict(folders)
        self._names = sorted(self._folders)

    def set(self, name: str, folder: Path | None) -> None:
        """`name` is served from `folder`, or (None) not served."""
        if folder is None:
            if self._folders.pop(name, None) is not None:
                del self._names[bisect.bisect_left(self._names, name)]
            return
        if name not in self._folders:
            bisect.insort(self._names, name)
        self._folders[name] = folder

    def page(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` names after `after` (from the first when None), in order."""
        start = 0 if after is None else bisect.bisect_right(self._names, after)
        return self._names[start:start + limit]
