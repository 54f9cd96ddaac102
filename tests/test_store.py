import json

from helpers import random_adapter
from ptmoe_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter
from ptmoe_serve.adapters.store import MANIFEST, STORE_LOCK, AdapterStore, FolderSignature


def adapter_bytes(tmp_path, seed=0):
    folder = tmp_path / f"src{seed}"
    write_adapter(random_adapter(seed=seed), folder)
    return (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()


def leftovers(store) -> list[str]:
    """What the store folder holds besides its lock file."""
    return sorted(p.name for p in store.root.iterdir() if p.name != STORE_LOCK)


def test_write_then_replace(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.write("a", *adapter_bytes(tmp_path, 1))
    store.write("a", *adapter_bytes(tmp_path, 2))
    assert sorted(store.folders()) == ["a"]
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

    store.recover()
    assert leftovers(store) == ["done", "kept"]
    read_adapter((store.root / "kept"))


def test_manifest_survives_a_new_store_object(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.write("a", *adapter_bytes(tmp_path))
    store.remember_loaded("linked", tmp_path / "elsewhere" / "x")
    store.remember_unloaded("a")
    store.remember_unloaded("not-in-store")
    again = AdapterStore(tmp_path / "store")
    assert again.manifest.linked == {"linked": str(tmp_path / "elsewhere" / "x")}
    assert again.manifest.unloaded == {"a"}
    data = json.loads((store.root / MANIFEST).read_text())
    assert data == {"linked": {"linked": str(tmp_path / "elsewhere" / "x")}, "unloaded": ["a"]}
    again.remember_loaded("a", again.root / "a")
    assert AdapterStore(tmp_path / "store").manifest.unloaded == set()


def test_signature_changes_when_a_file_is_rewritten(tmp_path):
    store = AdapterStore(tmp_path / "store")
    config, weights = adapter_bytes(tmp_path)
    folder = store.write("a", config, weights)
    before = FolderSignature.of(folder)
    (folder / WEIGHTS_FILE).write_bytes(weights + b" ")
    assert FolderSignature.of(folder) != before
    assert FolderSignature.of(tmp_path / "missing") is None


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
