"""The store's journal (adapters/journal.py): compaction that keeps every version, and a line a
crash tore."""

import json

from ptmoe_serve.adapters import journal
from ptmoe_serve.adapters.journal import JOURNAL
from helpers import adapter_bytes
from ptmoe_serve.adapters.store import AdapterStore, folder_stamp


def test_the_journal_is_compacted_keeping_versions_and_readers_follow(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "COMPACT_SLACK", 0)
    first, second = AdapterStore(tmp_path / "store"), AdapterStore(tmp_path / "store")
    folder, _ = first.write("a", *adapter_bytes(tmp_path, 1))
    assert second.journal.read_new() == {"a"}
    for _ in range(4):
        first.record_unloaded("b")
    first.record_unloaded("c")  # past the slack: rewritten to one line a name
    lines = (first.root / JOURNAL).read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == [1, 5, 6]
    assert second.journal.read_new() == {"b", "c"}  # the new file read whole, once
    assert second.version_of("a", folder, folder_stamp(folder)) == 1
    _, version = second.write("d", *adapter_bytes(tmp_path, 2))
    assert version == 7 and first.journal.read_new() == {"d"}


def test_a_line_torn_by_a_crash_is_dropped_before_the_next(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.record_unloaded("a")
    with open(store.root / JOURNAL, "ab") as f:
        f.write(b'{"version": 2, "na')
    again = AdapterStore(tmp_path / "store")
    assert again.journal.last_version == 1
    again.record_unloaded("b")
    assert AdapterStore(tmp_path / "store").journal.latest.keys() == {"a", "b"}
