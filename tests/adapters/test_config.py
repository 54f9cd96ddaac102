"""Adapter names (adapters/config.py): what a name may be."""

import pytest

from ptmoe_serve.adapters.config import AdapterError, validate_name


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", "../x", ".hidden", "x" * 129, "a b",
                                  "demo\n", "demo\r\n", "\ndemo", "de\nmo"])
def test_bad_names(name):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["tenant-42", "qa_v2", "Model.3"])
def test_good_names(name):
    assert validate_name(name) == name
