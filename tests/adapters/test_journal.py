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


def test_every_line_carries_a_checksum_and_a_damaged_line_never_stops_a_start(tmp_path):
    """Lines that do not verify or whose fields have the wrong types are skipped with a
    warning, however they were damaged; the good lines around them stand."""
    store = AdapterStore(tmp_path / "store")
    store.record_unloaded("a")
    good = (store.root / JOURNAL).read_bytes()
    assert b',"crc":' in good
    flipped = good.replace(b'"a"', b'"b"')  # one character changed: the checksum fails
    damaged = [flipped.strip(),
               b'{"version":Infinity,"name":"x"}', b'{"version":1e400,"name":"x"}',
               b'{"version":2,"name":["not","a","string"]}', b'{"version":true,"name":"x"}',
               b'{"version":3,"name":"x","stamp":"nope"}', b'[1,2,3]', b'\xff\xfe garbage',
               b'{"version":-4,"name":"x"}', b'{"version":5,"name":"x","inode":1.5}']
    with open(store.root / JOURNAL, "ab") as f:
        f.write(b"\n".join(damaged) + b"\n")
    again = AdapterStore(tmp_path / "store")
    assert again.journal.latest.keys() == {"a"} and again.journal.last_version == 1
    again.record_unloaded("c")  # numbered on from the good lines
    assert AdapterStore(tmp_path / "store").journal.latest["c"]["version"] == 2


def test_lines_written_before_checksums_are_still_read(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / JOURNAL).write_text('{"version":1,"name":"old","unloaded":true}\n')
    assert AdapterStore(tmp_path / "store").journal.latest["old"]["version"] == 1


def test_an_append_the_disk_cannot_hold_fails_whole_and_reuses_no_version(tmp_path):
    """A file-size limit (EFBIG, as a full disk's ENOSPC) stops the append part-way: the
    change fails, the torn bytes are cut back, and the next change gets the next version."""
    import subprocess
    import sys

    store = AdapterStore(tmp_path / "store")
    store.record_unloaded("a")
    size = (store.root / JOURNAL).stat().st_size
    script = ("import resource, sys; from pathlib import Path\n"
              "from ptmoe_serve.adapters.store import AdapterStore\n"
              "from ptmoe_serve.disk import StoreFull\n"
              "store = AdapterStore(Path(sys.argv[1]))\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 20}, {size + 20}))\n"
              "try:\n    store.record_unloaded('b' * 200)\n"
              "except StoreFull as e:\n    print('refused:', e, store.writable)\n")
    told = subprocess.run([sys.executable, "-c", script, str(store.root)], capture_output=True,
                          text=True, check=True).stdout
    assert "refused: the adapter store" in told and "is full" in told and "False" in told, told
    assert (store.root / JOURNAL).stat().st_size == size  # nothing torn left behind
    store.record_unloaded("c")
    fresh = AdapterStore(tmp_path / "store")
    assert {n: r["version"] for n, r in fresh.journal.latest.items()} == {"a": 1, "c": 2}


def test_lines_no_one_takes_are_bounded_and_the_store_lists_again(tmp_path):
    """The fine-tuning worker and a server that does not watch read lines they never take:
    past MAX_UNTAKEN_LINES none are kept, and the next look lists the store folder instead."""
    store = AdapterStore(tmp_path / "store")
    assert store.changes() == set()
    reader = AdapterStore(tmp_path / "store")
    store.journal.append([{"name": f"a{i}", "unloaded": True}
                          for i in range(journal.MAX_UNTAKEN_LINES + 1)])
    assert len(reader.journal.read_new()) == journal.MAX_UNTAKEN_LINES + 1
    assert reader.journal.take_lines() is None
    assert reader.journal.take_lines() == []  # kept again from here
    (store.root / "copied").mkdir()  # a change no line describes
    assert "copied" in store.changes()
