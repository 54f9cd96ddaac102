"""OpenAI's cursor pages (`after` an id, `limit` items), for every list route of the
project's own: files, fine-tuning jobs, their events and checkpoints. Files, jobs and events
are read a page at a time (list_page); short lists are cut from the whole (cursor_page)."""

from __future__ import annotations

from collections.abc import Sequence


def cursor_page(items: Sequence[dict], after: str | None, limit: int, key: str = "id") -> dict:
    """The `limit` items after the one whose `key` is `after` (none when no item has it), in
    the order given, as OpenAI's list object."""
    if after is not None:
        keys = [item[key] for item in items]
        items = items[keys.index(after) + 1:] if after in keys else []
    return list_page(list(items[:limit]), len(items) > limit, key)


def list_page(data: list[dict], has_more: bool, key: str = "id") -> dict:
    """A page already cut, as OpenAI's list object."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0][key] if data else None,
            "last_id": data[-1][key] if data else None}
