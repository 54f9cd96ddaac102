"""Every unpublished part of vLLM the project relies on (engine/vllm_internals.py) is still
there, as it was read: a failure names the installed vLLM's version and the object that moved."""

import importlib
import inspect

import pytest
import vllm

from ptmoe_serve.engine.vllm_internals import ATTRIBUTES, CALLABLES, VERIFIED_VERSION


def resolve(path: str):
    """The object at a dotted path (the longest importable module, then attributes), or the
    test's failure naming the vLLM version and the path."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                found = getattr(found, name)
        except AttributeError:
            break
        return found
    pytest.fail(f"{moved(path)} is gone")


def parameters(function) -> str:
    written = []
    for p in inspect.signature(function).parameters.values():
        if p.kind == p.KEYWORD_ONLY and not any(w.startswith("*") for w in written):
            written.append("*")
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        written.append(prefix + p.name + ("=" if p.default is not p.empty else ""))
    return ", ".join(written)


def moved(path: str) -> str:
    return f"vLLM {vllm.__version__} (read at {VERIFIED_VERSION}): {path}"


@pytest.mark.parametrize("path", sorted(CALLABLES))
def test_each_callable_keeps_its_parameters(path):
    assert parameters(resolve(path)) == CALLABLES[path], f"{moved(path)} takes other parameters"


@pytest.mark.parametrize("path", sorted(ATTRIBUTES))
def test_each_class_still_sets_its_attributes(path):
    cls = resolve(path)
    source = "".join(inspect.getsource(c) for c in cls.__mro__
                     if c is not object and c.__module__.split(".")[0] in ("vllm", "starlette"))
    missing = [name for name in ATTRIBUTES[path]
               if not hasattr(cls, name) and f"self.{name}" not in source]
    assert not missing, f"{moved(path)} no longer sets {missing}"


def test_a_moved_object_is_named():
    """The checks can fail, naming what moved: a parameter list that is not the function's,
    and an object that is not there."""
    assert parameters(resolve("vllm.entrypoints.launchers.launcher.setup_server")) \
        != "args, reuse_port"
    with pytest.raises(pytest.fail.Exception, match=r"vLLM .*: vllm\.v1\.engine\.NoSuchThing"):
        resolve("vllm.v1.engine.NoSuchThing")
