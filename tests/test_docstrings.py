"""Every public name has a docstring the API reference can render, and every CLI command and option a help.

Public = the functions and classes in a subpackage's ``__all__``, and the public methods and properties
those classes define themselves. A dataclass's generated ``__doc__`` (its signature) does not count.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

SUBPACKAGES = [
    "layerwise.hierarchy", "layerwise.hierarchy.learning", "layerwise.diffusion", "layerwise.kernels",
    "layerwise.diffeo", "layerwise.editing", "layerwise.editing.merge", "layerwise.tangent",
    "layerwise.decoding", "layerwise.sweep", "layerwise.experiments", "layerwise.experiments.claims",
    "layerwise.errors", "layerwise.report",
]


def _has_doc(obj) -> bool:
    doc = (obj.__doc__ or "").strip()
    return bool(doc) and not (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("))


def undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    assert getattr(module, "__all__", None), f"{module_name} has no __all__"
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants and registries are documented by their module
        if not _has_doc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attr.startswith("_") and inspect.isfunction(func) and not (func.__doc__ or "").strip():
                    missing.append(f"{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", SUBPACKAGES)
def test_public_names_have_docstrings(module_name):
    assert undocumented(module_name) == []


def test_the_check_catches_a_missing_docstring(monkeypatch):
    import layerwise.sweep as sweep

    def helper(x):
        return x

    class Thing:
        """Documented."""

        def method(self):
            return 1

    monkeypatch.setattr(sweep, "helper", helper, raising=False)
    monkeypatch.setattr(sweep, "Thing", Thing, raising=False)
    monkeypatch.setattr(sweep, "__all__", [*sweep.__all__, "helper", "Thing"])
    assert undocumented("layerwise.sweep") == ["helper", "Thing.method"]


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            return [(name, sub, helps.get(name)) for name, sub in action.choices.items()]
    return []


def test_every_command_and_option_has_help():
    from layerwise.cli import COMMAND_MODULES, build_parser

    missing = [f"module layerwise.cli.{name}" for name in COMMAND_MODULES
               if not (importlib.import_module(f"layerwise.cli.{name}").__doc__ or "").strip()]

    def walk(parser, path):
        for name, sub, help_text in _subcommands(parser):
            if not (help_text or sub.description):
                missing.append(f"{path} {name}")
            for action in sub._actions:
                structural = isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
                if not structural and not action.help:
                    missing.append(f"{path} {name} {'/'.join(action.option_strings) or action.dest}")
            walk(sub, f"{path} {name}")

    walk(build_parser(), "layerwise")
    assert len(COMMAND_MODULES) == len(_subcommands(build_parser()))
    assert missing == []
