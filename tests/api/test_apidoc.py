"""``docs/api.md`` is generated from the docstrings and must match them."""

from __future__ import annotations

from pathlib import Path

import outrelay
from outrelay.apidoc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_docs_api_md_is_up_to_date() -> None:
    assert DOC.read_text() == render(), (
        "docs/api.md is stale: run `python -m outrelay.apidoc > docs/api.md`"
    )


def test_every_public_name_is_documented() -> None:
    text = render()
    for name in outrelay.__all__:
        if name != "__version__":
            assert f"`outrelay.{name}" in text, name
            obj = getattr(outrelay, name)
            if isinstance(obj, type):
                assert obj.__doc__, name
    assert "per-stream callback" in text  # an alias's docstring (Handler) is rendered too
