"""Every adapter the store serves, by name: what a request's `model` may name, resident or not.

Looking a name up is a dict lookup, and the catalog changes only by the names a look at the
store says changed (manager.py), never by a walk over the store. It keeps its names in order
too, so that the management API pages through millions of them."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from pathlib import Path


class AdapterCatalog:
    def __init__(self, store_root: Path):
        self._store_root = store_root
        # By name: the folder it is linked from, or None for the store's own folder of that
        # name, made when asked (a Path for each of a million adapters costs seconds).
        self._folders: dict[str, Path | None] = {}
        self._names: list[str] = []  # sorted

    def __contains__(self, name: object) -> bool:
        return name in self._folders

    def __len__(self) -> int:
        return len(self._folders)

    def folder(self, name: str) -> Path | None:
        if name not in self._folders:
            return None
        return self._folders[name] or self._store_root / name

    def reset(self, in_store: Iterable[str], linked: Mapping[str, Path]) -> None:
        """Exactly these names: those served from their folder in the store and those linked
        from a folder elsewhere (sorted once)."""
        self._folders = dict.fromkeys(in_store)
        self._folders.update(linked)
        self._names = sorted(self._folders)

    def set(self, name: str, folder: Path | None) -> None:
        """`name` is served from `folder`, or (None) not served."""
        if folder is None:
            if name in self._folders:
                del self._folders[name]
                del self._names[bisect.bisect_left(self._names, name)]
            return
        if name not in self._folders:
            bisect.insort(self._names, name)
        self._folders[name] = None if folder == self._store_root / name else folder

    def page(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` names after `after` (from the first when None), in order."""
        start = 0 if after is None else bisect.bisect_right(self._names, after)
        return self._names[start:start + limit]
