import json
import os
import shutil
import time

from helpers import adapter_bytes, random_adapter
from ptmoe_serve.adapters import store as store_module
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter
from ptmoe_serve.adapters.journal import JOURNAL
from ptmoe_serve.adapters.store import MANIFEST, RESERVE, STORE_LOCK, AdapterStore, folder_stamp


def leftovers(store) -> list[str]:
    """What the store folder holds besides its lock file, journal and space kept back."""
    return sorted(p.name for p in store.root.iterdir()
                  if p.name not in (STORE_LOCK, JOURNAL, RESERVE))


def test_write_then_replace(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.write("a", *adapter_bytes(tmp_path, 1))
    store.write("a", *adapter_bytes(tmp_path, 2))
    assert leftovers(store) == ["a"]
    assert read_adapter((store.root / "a")).experts_a.equal(random_adapter(seed=2).experts_a)


def test_recover_drops_staged_uploads_and_restores_interrupted_replacements(tmp_path):
    store = AdapterStore(tmp_path / "store")
    config, weights = adapter_bytes(tmp_path)
    staged = store.root / ".staging-new-1234abcd"
    staged.mkdir()
    (staged / CONFIG_FILE).write_bytes(config)
    (staged / WEIGHTS_FILE).write_bytes(weights[:20])
    # Killed between moving the old version aside and moving the new one in:
    store.write("kept", config, weights)
    (store.root / "kept").rename(store.root / ".retired-kept-99990000")
    # Killed after the new version was in place, before the old one was removed:
    store.write("done", config, weights)
    store.write("old", config, weights)
    (store.root / "old").rename(store.root / ".retired-done-1111aaaa")
    (store.root / f"{MANIFEST}.5555ffff").write_text("{")
    (store.root / f"{JOURNAL}.compacting").write_text("{")

    store.recover()
    assert leftovers(store) == ["done", "kept"]
    read_adapter((store.root / "kept"))


def test_manifest_survives_a_new_store_object(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.write("a", *adapter_bytes(tmp_path))
    store.record_loaded("linked", tmp_path / "elsewhere" / "x", None)
    store.record_unloaded("a")
    store.record_unloaded("not-in-store")
    again = AdapterStore(tmp_path / "store")
    assert again.manifest.linked == {"linked": str(tmp_path / "elsewhere" / "x")}
    assert again.manifest.unloaded == {"a"}
    data = json.loads((store.root / MANIFEST).read_text())
    assert data == {"linked": {"linked": str(tmp_path / "elsewhere" / "x")}, "unloaded": ["a"]}
    again.record_loaded("a", again.root / "a", folder_stamp(again.root / "a"))
    assert AdapterStore(tmp_path / "store").manifest.unloaded == set()


def test_the_stamp_changes_when_a_file_is_rewritten(tmp_path):
    store = AdapterStore(tmp_path / "store")
    config, weights = adapter_bytes(tmp_path)
    folder, _ = store.write("a", config, weights)
    before = folder_stamp(folder)
    (folder / WEIGHTS_FILE).write_bytes(weights + b" ")
    assert folder_stamp(folder) != before
    assert folder_stamp(tmp_path / "missing") is None


def test_two_servers_writing_one_name_at_once_leave_one_whole_adapter(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    stores = [AdapterStore(tmp_path / "store"), AdapterStore(tmp_path / "store")]
    versions = [adapter_bytes(tmp_path, seed) for seed in (1, 2)]
    for _ in range(10):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: stores[i].write("a", *versions[i]), (0, 1)))
        assert leftovers(stores[0]) == ["a"]
        written = read_adapter(stores[0].root / "a").experts_a
        assert any(written.equal(random_adapter(seed=seed).experts_a) for seed in (1, 2))


def test_versions_come_from_the_store_and_every_server_over_it_agrees(tmp_path):
    first, second = AdapterStore(tmp_path / "store"), AdapterStore(tmp_path / "store")
    folder, v1 = first.write("a", *adapter_bytes(tmp_path, 1))
    _, v2 = second.write("b", *adapter_bytes(tmp_path, 2))
    assert (v1, v2) == (1, 2)
    # Each reads the lines the other wrote since it last looked (second, before writing).
    assert first.journal.read_new() == {"b"} and second.journal.read_new() == set()
    assert first.journal.latest == second.journal.latest
    stamp = folder_stamp(folder)
    assert first.version_of("a", folder, stamp) == second.version_of("a", folder, stamp) == 1
    # A version names one content: the same name rewritten is a new version, the old stamp
    # none.
    _, v3 = second.write("a", *adapter_bytes(tmp_path, 3))
    assert "a" in first.changes() and v3 == 3
    assert first.version_of("a", folder, stamp) is None
    assert first.version_of("a", folder, folder_stamp(folder)) == 3
    second.record_unloaded("a")
    assert first.changes() == {"a"} and first.manifest.unloaded == {"a"}  # read again
    assert first.version_of("a", folder, folder_stamp(folder)) is None
    # A restart reads them all again.
    assert AdapterStore(tmp_path / "store").version_of("b", folder.parent / "b",
                                                      folder_stamp(folder.parent / "b")) == 2


def test_folders_copied_in_by_hand_get_one_version_whichever_server_finds_them(tmp_path):
    first, second = AdapterStore(tmp_path / "store"), AdapterStore(tmp_path / "store")
    folder = first.root / "hand"
    write_adapter(random_adapter(), folder)
    assert first.changes() == {"hand"} == second.changes()
    stamp = folder_stamp(folder)
    found = first.record_found([("hand", folder, stamp)])
    assert found == second.record_found([("hand", folder, stamp)]) == {"hand": 1}
    # Changed since it was read: no version until it is read again.
    late = first.root / "late"
    write_adapter(random_adapter(), late)
    stamp = folder_stamp(late)
    (late / CONFIG_FILE).write_bytes((late / CONFIG_FILE).read_bytes() + b" ")
    assert second.record_found([("late", late, stamp)]) == {}
    assert second.record_found([("late", late, folder_stamp(late))]) == {"late": 2}


def test_the_listing_sees_folders_come_go_and_move_into_place(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LISTING_SETTLE_NS", 20_000_000)
    store = AdapterStore(tmp_path / "store")
    write_adapter(random_adapter(), store.root / "a")
    write_adapter(random_adapter(), store.root / "b")
    assert store.changes() == {"a", "b"}
    # Changed within the same tick of the folder's clock as the listing (its time unchanged):
    # seen when the listing is confirmed, once that tick has passed.
    write_adapter(random_adapter(seed=2), tmp_path / "new")
    (store.root / "a").rename(store.root / ".old-a")
    (tmp_path / "new").rename(store.root / "a")  # replaced by hand, in one move
    shutil.rmtree(store.root / "b")
    os.utime(store.root, ns=(store._listed_at, store._listed_at))
    assert store.changes() == set()
    time.sleep(0.03)
    assert store.changes() == {"a", "b"}
    time.sleep(0.03)
    assert store.changes() == set()
