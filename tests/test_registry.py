"""Registry: register/get/describe, "did you mean" errors, lazy loading, third-party paths and entry points."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

from dopsd_bench import registry as reg
from dopsd_bench.errors import UnknownNameError, UserError
from dopsd_bench.registry import METHODS, Registry


class Thing:
    """A documented thing.

    More text that is not the summary."""


def test_register_get_names_describe():
    r = Registry("widget")

    @r.register("alpha", description="first")
    def alpha():
        pass

    r.register("beta")(Thing)
    assert r.get("alpha") is alpha and r.get("beta") is Thing
    assert r.names() == ["alpha", "beta"] and "beta" in r and "gamma" not in r
    assert r.describe() == {"alpha": "first", "beta": "A documented thing."}


def test_description_from_attribute_and_none_for_data():
    r = Registry("widget")
    r.register("c")(type("C", (), {"description": "from attribute"}))
    r.register("d")({"a": 1})  # plain data: no docstring to show
    assert r.describe() == {"c": "from attribute", "d": ""}


def test_unknown_name_suggests_closest_and_lists_all():
    r = Registry("method")
    for name in ("dopsd", "sft", "dreambooth"):
        r.register(name)(Thing)
    with pytest.raises(UnknownNameError) as info:
        r.get("dpsd")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "unknown method 'dpsd'" in message and "did you mean 'dopsd'?" in message
    assert message.endswith("valid: dopsd, dreambooth, sft") and "\n" not in message
    assert info.value.valid == ["dopsd", "dreambooth", "sft"]


def test_unknown_name_without_a_close_match_or_any_names():
    r = Registry("method")
    r.register("sft")(Thing)
    assert "did you mean" not in str(pytest.raises(UnknownNameError, r.get, "zzzzzz").value)
    assert "no metric is registered" in str(pytest.raises(UnknownNameError, Registry("metric").get, "fd").value)


def test_duplicate_names_and_bad_names():
    r = Registry("method")
    r.register("a")(Thing)
    r.register("a")(Thing)  # the same object again (a module imported twice) is fine
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(dict)
    with pytest.raises(ValueError, match="without spaces"):
        r.register("has space")(Thing)


def test_loader_runs_once_lazily_and_retries_after_failure():
    calls = []

    def loader(registry):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first load fails")
        registry.register("late")(Thing)

    r = Registry("method", loader)
    assert calls == []  # nothing loads at construction
    with pytest.raises(RuntimeError):
        r.names()
    assert r.names() == ["late"] and r.get("late") is Thing
    assert len(calls) == 2


def test_import_optional_skips_missing_module_but_not_errors_inside(tmp_path, monkeypatch):
    reg.import_optional("dopsd_bench.backbones.not_written_yet")  # absent: skipped
    (tmp_path / "broken_plugin_mod.py").write_text("import a_module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        reg.import_optional("broken_plugin_mod")
    reg.import_submodules("dopsd_bench.package_that_does_not_exist")


PLUGIN = textwrap.dedent('''
    from dopsd_bench.registry import METHODS

    @METHODS.register("my-plugin-method", description="a third-party method")
    class MyMethod:
        pass
''')


@pytest.fixture
def empty_methods(restore_registries, monkeypatch):
    """METHODS with no built-ins, so path/entry-point loading is tested alone and fast."""
    monkeypatch.setattr(reg, "import_submodules", lambda package: None)
    METHODS._entries, METHODS._loaded, METHODS.extra_paths = {}, False, []
    return METHODS


def test_methods_from_env_path(empty_methods, tmp_path, monkeypatch):
    (tmp_path / "plugin_a.py").write_text(PLUGIN)
    (tmp_path / "_private.py").write_text("raise RuntimeError('files starting with _ are skipped')\n")
    monkeypatch.setenv("DOPSD_BENCH_METHODS_PATH", str(tmp_path))
    assert empty_methods.names() == ["my-plugin-method"]
    assert empty_methods.describe()["my-plugin-method"] == "a third-party method"


def test_methods_from_add_path_after_loading(empty_methods, tmp_path, monkeypatch):
    monkeypatch.delenv("DOPSD_BENCH_METHODS_PATH", raising=False)
    assert empty_methods.names() == []
    file = tmp_path / "plugin_b.py"
    file.write_text(PLUGIN.replace("my-plugin-method", "plugin-b"))
    empty_methods.add_path(file)
    assert empty_methods.names() == ["plugin-b"]
    with pytest.raises(UserError, match="neither a .py file nor a folder"):
        empty_methods.add_path(tmp_path / "nope.txt")


def test_methods_from_entry_points(empty_methods, tmp_path, monkeypatch):
    monkeypatch.delenv("DOPSD_BENCH_METHODS_PATH", raising=False)
    (tmp_path / "ep_plugin_mod.py").write_text("class EPMethod:\n    description = 'from an entry point'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ep_plugin_mod", raising=False)
    ep = importlib.metadata.EntryPoint(name="ep-method", value="ep_plugin_mod:EPMethod", group="dopsd_bench.methods")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [ep] if group == "dopsd_bench.methods" else [])
    assert empty_methods.names() == ["ep-method"]
    assert empty_methods.describe()["ep-method"] == "from an entry point"


def test_real_registries_load():
    """The shipped methods, tasks and backbones register themselves by name."""
    from dopsd_bench.registry import BACKBONES, TASKS

    assert {"concept", "style"} <= set(TASKS.names())
    assert "flux2-klein" in BACKBONES.names()
    assert {"base", "sft", "dopsd"} <= set(METHODS.names())


def test_a_plugin_that_takes_a_shipped_name_is_a_user_error(tmp_path):
    from dopsd_bench.errors import UserError
    from dopsd_bench.registry import METHODS

    METHODS.names()  # the shipped methods are registered
    with pytest.raises(UserError, match="method 'sft' is registered twice"):
        METHODS.add("sft", object())
