import asyncio
import contextlib
import shutil
import time

import pytest
import torch

from helpers import HOSTILE, hostile_folders, lock_held_by_another_process, random_adapter
from ptmoe_serve.adapters.config import AdapterError
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, write_adapter
from ptmoe_serve.adapters.manager import AdapterManager, PathNotAllowed
from ptmoe_serve.adapters.registry import AdapterExists, AdapterRegistry
from ptmoe_serve.adapters import store as store_module
from ptmoe_serve.adapters.store import AdapterStore

SETTLE_SECONDS = 0.02


@pytest.fixture(autouse=True)
def quick_settling(monkeypatch):
    """The store folder's time settles in 20 ms here (2 s in service, for clocks of other
    machines): `look` waits that long, as a watcher's interval does."""
    monkeypatch.setattr(store_module, "LISTING_SETTLE_NS", int(SETTLE_SECONDS * 1e9))


def look(m: AdapterManager) -> None:
    """The watcher's next look, a tick of the store folder's clock after the last change."""
    time.sleep(2 * SETTLE_SECONDS)
    asyncio.run(m.sync_store())


@pytest.fixture
def roots(tmp_path):
    store, library, outside = tmp_path / "store", tmp_path / "library", tmp_path / "outside"
    for folder in (store, library, outside):
        folder.mkdir()
    return store, library, outside


def manager(store_dir, library) -> AdapterManager:
    registry = AdapterRegistry(16, 64, torch.device("cpu"))
    result = AdapterManager(registry, AdapterStore(store_dir), [library])
    result.start()
    return result


def served(m: AdapterManager) -> list[str]:
    """What the manager's catalog says the store serves, resident or not."""
    return m.catalog.page(None, len(m.catalog))


def resident(m: AdapterManager) -> list[str]:
    return [e.name for e in m.registry.entries()]


def make_resident(m: AdapterManager, *names: str) -> None:
    """As a request does: acquired (loaded if need be), then released."""
    async def run():
        for name in names:
            m.resident.release(await m.resident.acquire(name))
    asyncio.run(run())


def fetch(m: AdapterManager, name: str):
    return asyncio.run(m.fetch(name))


def upload(m: AdapterManager, name: str, config: bytes, weights: bytes):
    return asyncio.run(m.upload(name, config, weights))


def files(adapter) -> tuple[bytes, bytes]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_adapter(adapter, Path(d))
        return (Path(d) / CONFIG_FILE).read_bytes(), (Path(d) / WEIGHTS_FILE).read_bytes()


def test_start_reads_the_index_not_the_weights_and_a_bad_folder_fails_at_its_first_read(roots):
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "good")
    write_adapter(random_adapter(hidden_size=8), store / "wrong-size")
    (store / "empty").mkdir()
    m = manager(store, library)
    assert served(m) == ["empty", "good", "wrong-size"] and resident(m) == []
    assert m.registry.bank_bytes == 0
    make_resident(m, "good")
    assert resident(m) == ["good"]
    with pytest.raises(AdapterError, match="hidden_size is 8"):
        fetch(m, "wrong-size")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        fetch(m, "empty")
    assert sorted(m.failed) == ["empty", "wrong-size"] and resident(m) == ["good"]


def test_load_path_checks_the_allowed_roots(roots):
    store, library, outside = roots
    m = manager(store, library)
    write_adapter(random_adapter(), library / "lib")
    write_adapter(random_adapter(), outside / "evil")
    (library / "link").symlink_to(outside / "evil")
    assert asyncio.run(m.load_path("lib", str(library / "lib"), replace=False)).name == "lib"
    with pytest.raises(PathNotAllowed):
        asyncio.run(m.load_path("evil", str(outside / "evil"), replace=False))
    with pytest.raises(PathNotAllowed):
        asyncio.run(m.load_path("evil", str(library / "link"), replace=False))
    with pytest.raises(PathNotAllowed):
        asyncio.run(m.load_path("evil", str(library / ".." / "outside" / "evil"), replace=False))
    with pytest.raises(AdapterError, match="must be absolute"):
        asyncio.run(m.load_path("rel", "library/lib", replace=False))
    with pytest.raises(AdapterError, match="does not exist"):
        asyncio.run(m.load_path("gone", str(library / "gone"), replace=False))
    with pytest.raises(AdapterExists):
        asyncio.run(m.load_path("lib", str(library / "lib"), replace=False))
    assert resident(m) == served(m) == ["lib"]


def test_upload_validates_before_writing(roots):
    store, library, _ = roots
    m = manager(store, library)
    config, weights = files(random_adapter(seed=1))
    with pytest.raises(AdapterError, match="hidden_size"):
        upload(m, "bad", *files(random_adapter(hidden_size=8)))
    with pytest.raises(AdapterError, match="corrupt|truncated"):
        upload(m, "bad", config, weights[:-7])
    assert not (store / "bad").exists() and len(m.registry) == 0
    first = upload(m, "a", config, weights)
    second = upload(m, "a", *files(random_adapter(seed=2)))
    assert second.version > first.version and m.registry.get("a") is second


def test_restart_remembers_links_and_unloads(roots):
    store, library, _ = roots
    m = manager(store, library)
    write_adapter(random_adapter(), library / "lib")
    asyncio.run(m.load_path("linked", str(library / "lib"), replace=False))
    upload(m, "up", *files(random_adapter(seed=1)))
    upload(m, "dropped", *files(random_adapter(seed=2)))
    asyncio.run(m.unload("dropped", purge=False))
    upload(m, "purged", *files(random_adapter(seed=3)))
    asyncio.run(m.unload("purged", purge=True))
    assert (store / "dropped").exists() and not (store / "purged").exists()
    again = manager(store, library)
    assert served(again) == ["linked", "up"]


def test_watching_the_store(roots):
    store, library, _ = roots
    m = manager(store, library)
    write_adapter(random_adapter(seed=1), library / "src")
    # A folder still being copied: the config is there, the weights not yet. It is served
    # once its files are whole: its first read before then fails, the next one after them.
    (store / "new").mkdir()
    shutil.copy(library / "src" / CONFIG_FILE, store / "new")
    look(m)
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        make_resident(m, "new")
    shutil.copy(library / "src" / WEIGHTS_FILE, store / "new")
    look(m)
    make_resident(m, "new")
    first = m.registry.get("new")
    # Replaced by hand: the new folder moved into place (files rewritten in place are not
    # followed: that would take a stat per adapter at every look). The resident copy is
    # replaced at once.
    write_adapter(random_adapter(seed=2), library / "next")
    (store / "new").rename(store / ".old")
    (library / "next").rename(store / "new")
    look(m)
    assert m.registry.get("new").version > first.version
    shutil.rmtree(store / "new")
    look(m)
    assert "new" not in m.registry and "new" not in m.catalog


def test_an_unloaded_store_folder_is_not_reloaded_by_the_watcher(roots):
    store, library, _ = roots
    m = manager(store, library)
    upload(m, "a", *files(random_adapter()))
    asyncio.run(m.unload("a", purge=False))
    look(m)
    assert "a" not in m.registry and "a" not in m.catalog


def test_a_new_folder_under_an_unloaded_name_is_served(roots):
    store, library, _ = roots
    m = manager(store, library)
    upload(m, "a", *files(random_adapter(seed=1)))
    asyncio.run(m.unload("a", purge=False))
    shutil.rmtree(store / "a")
    look(m)
    write_adapter(random_adapter(seed=2), store / "a")
    look(m)
    assert "a" in m.catalog


def test_hostile_store_folders_fail_at_their_first_read_listed_and_reserve_nothing(roots):
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "good")
    hostile_folders(store, store / "good")
    cases = HOSTILE
    m = manager(store, library)
    make_resident(m, "good")
    for name, reason in cases.items():
        with pytest.raises(AdapterError, match=reason):
            make_resident(m, name)
        assert reason in m.failed[name], m.failed[name]
    assert resident(m) == ["good"] and sorted(m.failed) == sorted(cases)
    # Only the good adapter's shape got a bank, of one slot.
    assert m.registry.bank_bytes == m.registry.get("good").bank.bytes_per_slot


def test_the_watcher_follows_hostile_folders_and_keeps_going(roots):
    store, library, _ = roots
    m = manager(store, library)
    write_adapter(random_adapter(seed=1), library / "template")
    hostile_folders(store, library / "template")
    cases = HOSTILE
    write_adapter(random_adapter(seed=2), store / "new")
    look(m)
    for name in ["new", *cases]:
        with contextlib.suppress(AdapterError):
            make_resident(m, name)
    assert resident(m) == ["new"] and sorted(m.failed) == sorted(cases)
    # Fixed in place, a folder loads and leaves the failed list; removed, it leaves it too.
    shutil.rmtree(store / "huge-rank")
    write_adapter(random_adapter(seed=3), store / "huge-rank")
    shutil.rmtree(store / "deep-json")
    look(m)
    make_resident(m, "huge-rank")
    assert resident(m) == ["huge-rank", "new"]
    assert sorted(m.failed) == ["not-a-config", "null-shape"]


def test_a_path_outside_the_roots_gets_the_same_refusal_whether_or_not_it_exists(roots):
    store, library, outside = roots
    m = manager(store, library)
    write_adapter(random_adapter(), outside / "real")
    messages = []
    for path in (outside / "real", outside / "imagined", "/etc/ssh", "/no/such/place"):
        with pytest.raises(PathNotAllowed) as refused:
            asyncio.run(m.load_path("x", str(path), replace=False))
        messages.append(str(refused.value).replace(str(path), "PATH"))
    assert len(set(messages)) == 1, messages


def test_servers_over_one_store_follow_each_others_unloads_loads_and_links(roots):
    """Two servers' managers over one store: what one records in the manifest, the other
    follows on its next look (the watcher's tick)."""
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "s")
    write_adapter(random_adapter(seed=2), library / "lib")
    first, second = manager(store, library), manager(store, library)

    def looked(m):
        look(m)
        return served(m)

    assert looked(first) == looked(second) == ["s"]
    asyncio.run(first.unload("s", purge=False))  # the folder stays; the manifest says unloaded
    assert looked(second) == []
    asyncio.run(first.load_path("s", str(store / "s"), replace=False))
    assert looked(second) == ["s"]
    asyncio.run(first.load_path("lib", str(library / "lib"), replace=False))
    assert looked(second) == ["lib", "s"]
    make_resident(second, "lib")
    assert second.registry.get("lib").source == library / "lib"
    asyncio.run(first.unload("lib", purge=False))
    assert looked(second) == ["s"] and "lib" not in second.registry
    # Each server's own changes leave it nothing to redo: no new version on its next look.
    version = first.registry.get("s").version
    assert looked(first) == ["s"] and first.registry.get("s").version == version


def test_manifest_changes_from_two_servers_are_never_lost(roots):
    """Each change reads the manifest afresh under a lock: a server holding an old copy does
    not overwrite another's change."""
    store, library, _ = roots
    for name in ("a", "b"):
        write_adapter(random_adapter(), store / name)
    first, second = AdapterStore(store), AdapterStore(store)
    first.record_unloaded("a")
    second.record_unloaded("b")  # its copy predates first's change
    assert AdapterStore(store).manifest.unloaded == {"a", "b"}


def test_servers_over_one_store_agree_on_versions_and_never_go_back(roots):
    """Versions are the store's: both servers give each content the same number, whichever
    made the change or found the folder, and a server never serves an older one again."""
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "found")  # copied in by hand
    first, second = manager(store, library), manager(store, library)

    def versions(m):
        look(m)
        make_resident(m, *served(m))
        return {e.name: e.version for e in m.registry.entries()}

    assert versions(first) == versions(second) == {"found": 1}
    upload(first, "up", *files(random_adapter(seed=2)))
    upload(second, "up", *files(random_adapter(seed=3)))  # replaced through the other
    assert versions(first) == versions(second) == {"found": 1, "up": 3}
    # A folder linked from another root, replaced at the same path: the new content reaches
    # the other server as a new version.
    write_adapter(random_adapter(seed=4), library / "lib")
    asyncio.run(first.load_path("lib", str(library / "lib"), replace=False))
    assert versions(second)["lib"] == 4
    write_adapter(random_adapter(seed=5), library / "lib.new")
    shutil.rmtree(library / "lib")
    (library / "lib.new").rename(library / "lib")
    asyncio.run(first.load_path("lib", str(library / "lib"), replace=True))
    assert versions(second)["lib"] == versions(first)["lib"] == 5
    replaced = second.registry.get("lib").adapter.experts_a
    assert replaced.equal(random_adapter(seed=5).experts_a)
    # An older version reaching a server late changes nothing.
    entry = second.registry.get("up")
    assert second._add("up", random_adapter(seed=2), 2, store / "up") is entry


def test_a_look_at_the_store_costs_its_changes_not_its_adapters(roots, monkeypatch):
    """A server following a store of many adapters stats nothing at an idle look, and only
    what changed at a look after a change."""
    import ptmoe_serve.adapters.manager as manager_module

    store, library, _ = roots
    first = manager(store, library)
    for i in range(50):
        upload(first, f"a{i}", *files(random_adapter(seed=i)))
    second = manager(store, library)
    make_resident(second, *served(second))
    stamped, listed = [], []
    original_stamp, original_scandir = manager_module.folder_stamp, store_module.os.scandir
    monkeypatch.setattr(manager_module, "folder_stamp",
                        lambda folder: stamped.append(folder.name) or original_stamp(folder))
    monkeypatch.setattr(store_module.os, "scandir", lambda path: (
        path == second.store.root and listed.append(path)) or original_scandir(path))
    look(second)  # confirms its start-up listing
    stamped.clear(), listed.clear()
    look(second)
    assert stamped == [] and listed == []
    # Changes through the other server: read from the journal, the store folder not listed.
    asyncio.run(first.unload("a7", purge=False))
    upload(first, "a9", *files(random_adapter(seed=99)))
    look(second)
    assert sorted(set(stamped)) == ["a9"] and listed == [] and "a7" not in second.registry
    # A change by hand: the folder listed (names and inodes, still no stat per folder).
    shutil.rmtree(store / "a3")
    look(second)
    assert "a3" not in second.registry and len(listed) == 1


def capped(store_dir, library, capacity: int, lock_timeout: float = 5.0) -> AdapterManager:
    from ptmoe_serve.adapters.manager import ResidencyLimits

    registry = AdapterRegistry(16, 64, torch.device("cpu"))
    result = AdapterManager(registry, AdapterStore(store_dir, lock_timeout), [library],
                            ResidencyLimits(capacity, 0, wait_seconds=10))
    result.start()
    return result


def test_an_unload_during_a_cold_loads_wait_wins(roots):
    """The only slot is held; a cold request waits for it; the adapter is unloaded meanwhile:
    when the slot frees, the waiting request is told it is gone, and nothing is placed."""
    store, library, _ = roots
    for seed, name in enumerate(("busy", "cold")):
        write_adapter(random_adapter(seed=seed), store / name)
    m = capped(store, library, 1)

    async def run():
        held = await m.resident.acquire("busy")
        waiting = asyncio.ensure_future(m.resident.acquire("cold"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await m.unload("cold", purge=False)
        m.resident.release(held)
        with pytest.raises(KeyError):
            await waiting

    asyncio.run(run())
    assert "cold" not in resident(m) and "cold" not in m.catalog


def test_a_replace_through_a_replica_during_a_cold_loads_wait_is_what_gets_placed(roots):
    store, library, _ = roots
    for seed, name in enumerate(("busy", "cold")):
        write_adapter(random_adapter(seed=seed), store / name)
    m = capped(store, library, 1)
    replica = manager(store, library)

    async def run():
        held = await m.resident.acquire("busy")
        waiting = asyncio.ensure_future(m.resident.acquire("cold"))
        await asyncio.sleep(0.2)
        await replica.upload("cold", *files(random_adapter(seed=7)))
        await asyncio.sleep(2 * SETTLE_SECONDS)
        await m.sync_store()  # the watcher's look sees the replica's change
        m.resident.release(held)
        entry = await waiting
        m.resident.release(entry)
        return entry

    entry = asyncio.run(run())
    assert entry.version == replica.registry.get("cold").version
    assert entry.adapter.experts_a.equal(random_adapter(seed=7).experts_a)


def test_an_unload_the_store_refuses_leaves_the_adapter_served(roots):
    """A peer holds the store's lock: the unload answers StoreBusy after the timeout, and the
    adapter is still listed and resident here."""
    from ptmoe_serve.adapters.store import STORE_LOCK
    from ptmoe_serve.disk import StoreBusy

    store, library, _ = roots
    write_adapter(random_adapter(), store / "kept")
    m = capped(store, library, 4, lock_timeout=0.2)
    make_resident(m, "kept")
    with lock_held_by_another_process(store / STORE_LOCK):
        with pytest.raises(StoreBusy, match="locked by another process"):
            asyncio.run(m.unload("kept", purge=True))
    assert "kept" in m.catalog and resident(m) == ["kept"] and (store / "kept").is_dir()
    asyncio.run(m.unload("kept", purge=True))  # and once the peer lets go, it goes
    assert "kept" not in m.catalog and not (store / "kept").exists()


def test_a_unload_killed_between_manifest_and_journal_reaches_other_servers(roots):
    """The manifest is read again when it changes, not only after a journal line: a server
    that died between the two still has its unload followed without a restart."""
    store, library, _ = roots
    write_adapter(random_adapter(), store / "a")
    other = manager(store, library)
    look(other)
    assert served(other) == ["a"]
    writer = AdapterStore(store)
    with writer._locked():
        writer._change_manifest(lambda manifest: manifest.unloaded.add("a"))  # then it dies
    look(other)
    assert served(other) == []
