"""Render the Python API reference (``docs/api.md``) from the docstrings.

``python -m outrelay.apidoc > docs/api.md`` regenerates it; a test
(``tests/api/test_apidoc.py``) fails when the committed file is out of date. Covers
:data:`outrelay.__all__` and :data:`outrelay.sync.__all__`: every class with its
public methods and properties, every function, every alias, with signatures.
"""

from __future__ import annotations

import inspect
import sys
from types import ModuleType

import outrelay
import outrelay.sync

__all__ = ["render"]

HEADER = """# Python API reference

Generated from the docstrings by `python -m outrelay.apidoc > docs/api.md`; do not edit.
Everything here is semver-stable within a major version (see the README, "Python API").
"""


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def _block(text: str) -> list[str]:
    return [text, ""] if text else []


def _class(prefix: str, name: str, cls: type) -> list[str]:
    lines = [f"### class `{prefix}{name}{_signature(cls)}`", "", *_block(_doc(cls))]
    if issubclass(cls, BaseException):
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        lines += [f"Subclass of `{bases}`.", ""]
    for attr, member in cls.__dict__.items():
        if attr.startswith("_") and attr not in ("__aenter__", "__enter__"):
            continue
        if isinstance(member, property):
            lines += [f"#### property `{name}.{attr}`", "", *_block(_doc(member))]
        elif isinstance(member, classmethod):
            func = member.__func__
            lines += [
                f"#### classmethod `{name}.{attr}{_signature(getattr(cls, attr))}`",
                "",
                *_block(_doc(func)),
            ]
        elif inspect.isfunction(member):
            kind = "async method" if inspect.iscoroutinefunction(member) else "method"
            lines += [f"#### {kind} `{name}.{attr}{_signature(member)}`", "", *_block(_doc(member))]
    return lines


def _module(module: ModuleType, prefix: str) -> list[str]:
    lines = [f"## `{module.__name__}`", ""]
    for name in module.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(module, name)
        if inspect.isclass(obj):
            lines += _class(prefix, name, obj)
        elif inspect.isfunction(obj):
            kind = "async function" if inspect.iscoroutinefunction(obj) else "function"
            lines += [f"### {kind} `{prefix}{name}{_signature(obj)}`", "", *_block(_doc(obj))]
        else:
            lines += [f"### `{prefix}{name}` = `{obj!r}`", ""]
            source = inspect.getsource(sys.modules["outrelay.api"])
            marker = f"{name} = "
            if marker in source:
                after = source.split(marker, 1)[1]
                if '"""' in after.split("\n\n", 1)[0]:
                    lines += _block(inspect.cleandoc(after.split('"""')[1]))
    return lines


def render() -> str:
    """The whole reference, as Markdown."""
    lines = [HEADER, f"Version {outrelay.__version__}.", ""]
    lines += _module(outrelay, "outrelay.")
    lines += _module(outrelay.sync, "outrelay.sync.")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
