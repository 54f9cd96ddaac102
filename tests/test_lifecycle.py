import asyncio
import shutil

import pytest
import torch

from helpers import HOSTILE, hostile_folders, random_adapter
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, write_adapter
from ptmoe_serve.adapters.manager import AdapterManager, PathNotAllowed
from ptmoe_serve.adapters.registry import AdapterExists, AdapterRegistry
from ptmoe_serve.adapters.store import AdapterStore


@pytest.fixture
def roots(tmp_path):
    store, library, outside = tmp_path / "store", tmp_path / "library", tmp_path / "outside"
    for folder in (store, library, outside):
        folder.mkdir()
    return store, library, outside


def manager(store_dir, library) -> AdapterManager:
    registry = AdapterRegistry(16, 64, torch.device("cpu"))
    result = AdapterManager(registry, AdapterStore(store_dir), [library])
    for _ in result.start_in_batches():
        pass
    return result


def upload(m: AdapterManager, name: str, config: bytes, weights: bytes):
    return asyncio.run(m.upload(name, config, weights))


def files(adapter) -> tuple[bytes, bytes]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_adapter(adapter, Path(d))
        return (Path(d) / CONFIG_FILE).read_bytes(), (Path(d) / WEIGHTS_FILE).read_bytes()


def test_start_serves_the_store_and_skips_bad_folders(roots):
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "good")
    write_adapter(random_adapter(hidden_size=8), store / "wrong-size")
    (store / "empty").mkdir()
    m = manager(store, library)
    assert [e.name for e in m.registry.entries()] == ["good"]


def test_start_loads_in_batches_into_banks_sized_once(roots):
    """A bulk start-up: the bank is allocated once for all, and the adapters are read a batch
    at a time, as the caller asks for them (each batch moves to the engine's workers before the
    next is read)."""
    store, library, _ = roots
    for i in range(10):
        write_adapter(random_adapter(seed=i), store / f"a{i}")
    write_adapter(random_adapter(hidden_size=8), store / "wrong-size")
    registry = AdapterRegistry(16, 64, torch.device("cpu"))
    m = AdapterManager(registry, AdapterStore(store), [library])
    batches = m.start_in_batches(batch_parameters=3 * random_adapter().num_parameters)
    first = next(batches)
    assert len(first) == 3 and len(registry) == 3
    bank = first[0].bank
    assert bank.capacity == 10
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert len(registry) == 10 and bank.capacity == 10


def test_load_path_checks_the_allowed_roots(roots):
    store, library, outside = roots
    m = manager(store, library)
    write_adapter(random_adapter(), library / "lib")
    write_adapter(random_adapter(), outside / "evil")
    (library / "link").symlink_to(outside / "evil")
    assert m.load_path("lib", str(library / "lib"), replace=False).name == "lib"
    with pytest.raises(PathNotAllowed):
        m.load_path("evil", str(outside / "evil"), replace=False)
    with pytest.raises(PathNotAllowed):
        m.load_path("evil", str(library / "link"), replace=False)
    with pytest.raises(PathNotAllowed):
        m.load_path("evil", str(library / ".." / "outside" / "evil"), replace=False)
    with pytest.raises(AdapterError, match="must be absolute"):
        m.load_path("rel", "library/lib", replace=False)
    with pytest.raises(AdapterError, match="does not exist"):
        m.load_path("gone", str(library / "gone"), replace=False)
    with pytest.raises(AdapterExists):
        m.load_path("lib", str(library / "lib"), replace=False)
    assert [e.name for e in m.registry.entries()] == ["lib"]


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
    m.load_path("linked", str(library / "lib"), replace=False)
    upload(m, "up", *files(random_adapter(seed=1)))
    upload(m, "dropped", *files(random_adapter(seed=2)))
    m.unload("dropped", purge=False)
    upload(m, "purged", *files(random_adapter(seed=3)))
    m.unload("purged", purge=True)
    assert (store / "dropped").exists() and not (store / "purged").exists()
    again = manager(store, library)
    assert [e.name for e in again.registry.entries()] == ["linked", "up"]


def test_watching_the_store(roots):
    store, library, _ = roots
    m = manager(store, library)
    write_adapter(random_adapter(seed=1), library / "src")
    # A folder still being copied: the config is there, the weights not yet.
    (store / "new").mkdir()
    shutil.copy(library / "src" / CONFIG_FILE, store / "new")
    m.sync_store()
    assert "new" not in m.registry
    shutil.copy(library / "src" / WEIGHTS_FILE, store / "new")
    m.sync_store()
    first = m.registry.get("new")
    write_adapter(random_adapter(seed=2), store / "new")  # rewritten in place
    m.sync_store()
    assert m.registry.get("new").version > first.version
    shutil.rmtree(store / "new")
    m.sync_store()
    assert "new" not in m.registry


def test_an_unloaded_store_folder_is_not_reloaded_by_the_watcher(roots):
    store, library, _ = roots
    m = manager(store, library)
    upload(m, "a", *files(random_adapter()))
    m.unload("a", purge=False)
    m.sync_store()
    assert "a" not in m.registry


def test_a_new_folder_under_an_unloaded_name_is_served(roots):
    store, library, _ = roots
    m = manager(store, library)
    upload(m, "a", *files(random_adapter(seed=1)))
    m.unload("a", purge=False)
    shutil.rmtree(store / "a")
    m.sync_store()
    write_adapter(random_adapter(seed=2), store / "a")
    m.sync_store()
    assert "a" in m.registry


def test_hostile_store_folders_are_skipped_listed_and_reserve_nothing(roots):
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "good")
    hostile_folders(store, store / "good")
    cases = HOSTILE
    m = manager(store, library)
    assert [e.name for e in m.registry.entries()] == ["good"]
    assert sorted(m.failed) == sorted(cases)
    for name, reason in cases.items():
        assert reason in m.failed[name], m.failed[name]
    # Only the good adapter's shape got a bank, of one slot.
    assert [bank.capacity for bank in m.registry.banks.values()] == [1]


def test_the_watcher_skips_hostile_folders_and_keeps_going(roots):
    store, library, _ = roots
    m = manager(store, library)
    write_adapter(random_adapter(seed=1), library / "template")
    hostile_folders(store, library / "template")
    cases = HOSTILE
    write_adapter(random_adapter(seed=2), store / "new")
    m.sync_store()
    assert [e.name for e in m.registry.entries()] == ["new"] and sorted(m.failed) == sorted(cases)
    # Fixed in place, a folder loads and leaves the failed list; removed, it leaves it too.
    shutil.rmtree(store / "huge-rank")
    write_adapter(random_adapter(seed=3), store / "huge-rank")
    shutil.rmtree(store / "deep-json")
    m.sync_store()
    assert [e.name for e in m.registry.entries()] == ["huge-rank", "new"]
    assert sorted(m.failed) == ["not-a-config", "null-shape"]


def test_a_path_outside_the_roots_gets_the_same_refusal_whether_or_not_it_exists(roots):
    store, library, outside = roots
    m = manager(store, library)
    write_adapter(random_adapter(), outside / "real")
    messages = []
    for path in (outside / "real", outside / "imagined", "/etc/ssh", "/no/such/place"):
        with pytest.raises(PathNotAllowed) as refused:
            m.load_path("x", str(path), replace=False)
        messages.append(str(refused.value).replace(str(path), "PATH"))
    assert len(set(messages)) == 1, messages


def test_servers_over_one_store_follow_each_others_unloads_loads_and_links(roots):
    """Two servers' managers over one store: what one records in the manifest, the other
    follows on its next look (the watcher's tick)."""
    store, library, _ = roots
    write_adapter(random_adapter(seed=1), store / "s")
    write_adapter(random_adapter(seed=2), library / "lib")
    first, second = manager(store, library), manager(store, library)

    def served(m):
        m.sync_store()
        return [e.name for e in m.registry.entries()]

    assert served(first) == served(second) == ["s"]
    first.unload("s", purge=False)  # the folder stays; the manifest says unloaded
    assert served(second) == []
    first.load_path("s", str(store / "s"), replace=False)
    assert served(second) == ["s"]
    first.load_path("lib", str(library / "lib"), replace=False)
    assert served(second) == ["lib", "s"]
    assert second.registry.get("lib").source == library / "lib"
    first.unload("lib", purge=False)
    assert served(second) == ["s"]
    # Each server's own changes leave it nothing to redo: no new version on its next look.
    version = first.registry.get("s").version
    assert served(first) == ["s"] and first.registry.get("s").version == version


def test_manifest_changes_from_two_servers_are_never_lost(roots):
    """Each change reads the manifest afresh under a lock: a server holding an old copy does
    not overwrite another's change."""
    store, library, _ = roots
    for name in ("a", "b"):
        write_adapter(random_adapter(), store / name)
    first, second = AdapterStore(store), AdapterStore(store)
    first.remember_unloaded("a")
    second.remember_unloaded("b")  # its copy predates first's change
    assert AdapterStore(store).manifest.unloaded == {"a", "b"}
