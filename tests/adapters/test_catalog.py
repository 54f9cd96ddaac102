"""The catalog (adapters/catalog.py): names to folders, kept in order for paging."""

from pathlib import Path

from ptmoe_serve.adapters.catalog import AdapterCatalog


def test_names_are_found_changed_and_paged_in_order():
    catalog = AdapterCatalog(Path("/s"))
    catalog.reset(in_store=(f"a{i:03d}" for i in range(0, 98, 2)),
                  linked={"a098": Path("/elsewhere/a098")})
    assert len(catalog) == 50 and "a004" in catalog and "a005" not in catalog
    assert catalog.folder("a002") == Path("/s/a002")
    assert catalog.folder("a098") == Path("/elsewhere/a098") and catalog.folder("a001") is None
    catalog.set("a005", Path("/elsewhere/x"))
    catalog.set("a004", None)
    catalog.set("a004", None)  # already gone
    catalog.set("a006", Path("/s/new-a006"))  # moved: still one name
    assert catalog.folder("a005") == Path("/elsewhere/x") and catalog.folder("a004") is None
    assert catalog.folder("a006") == Path("/s/new-a006") and len(catalog) == 50
    catalog.set("a006", Path("/s/a006"))  # back in its store folder
    catalog.set("a008", Path("/s/a008"))  # already there
    assert catalog.folder("a006") == Path("/s/a006") and catalog.folder("a008") == Path("/s/a008")
    assert len(catalog) == 50
    assert catalog.page(None, 4) == ["a000", "a002", "a005", "a006"]
    assert catalog.page("a005", 2) == ["a006", "a008"]
    assert catalog.page("a0055", 1) == ["a006"]  # after a name not in it
    assert catalog.page("a098", 5) == [] and catalog.page("zzz", 5) == []
    pages, after = [], None
    while page := catalog.page(after, 7):
        pages += page
        after = page[-1]
    assert pages == sorted(pages) and len(pages) == 50
