"""docs/api.md documents every public name of ders_peft, with the parameters the code really has."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import peft
import pytest

import ders_peft

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_PEFT_FIELDS = {f.name for f in dataclasses.fields(peft.PeftConfig)}


def documented_entries(text: str) -> dict[str, str]:
    """``### `name` `` headings of api.md -> the text up to the next heading."""
    parts = re.split(r"^#{2,4} `([A-Za-z_][A-Za-z0-9_]*)`[ \t]*$", text, flags=re.M)
    return {parts[i]: re.split(r"^#{1,4} ", parts[i + 1], maxsplit=1, flags=re.M)[0] for i in range(1, len(parts), 2)}


def parameter_names(obj: object) -> list[str]:
    """Named parameters of a public callable (``**kwargs`` and peft's inherited config fields left out)."""
    if not callable(obj) or isinstance(obj, dict):
        return []
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return []
    skip = _PEFT_FIELDS if inspect.isclass(obj) and issubclass(obj, peft.PeftConfig) else set()
    return [
        p.name
        for p in params
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in skip and p.name != "self"
    ]


def test_entry_parser_reads_headings():
    text = "# API\n\n### `alpha`\n\n```python\nalpha(x)\n```\n\nAbout alpha.\n\n## Group\n\n### `Beta`\n\nBeta.\n"
    entries = documented_entries(text)
    assert set(entries) == {"alpha", "Beta"}
    assert "alpha(x)" in entries["alpha"] and "Beta" not in entries["alpha"]


def test_every_public_name_has_an_entry():
    entries = documented_entries(API_MD.read_text())
    missing = sorted(set(ders_peft.__all__) - set(entries))
    assert not missing, f"names in ders_peft.__all__ without a '### `name`' entry in docs/api.md: {missing}"
    stale = sorted(set(entries) - set(ders_peft.__all__))
    assert not stale, f"docs/api.md documents names that are not in ders_peft.__all__: {stale}"


@pytest.mark.parametrize("name", sorted(ders_peft.__all__))
def test_entry_has_signature_and_paragraph(name):
    entries = documented_entries(API_MD.read_text())
    if name not in entries:
        pytest.skip("reported by test_every_public_name_has_an_entry")
    entry = entries[name]
    code = re.findall(r"```python\n(.+?)\n```", entry, flags=re.S)
    assert code and name in code[0], f"docs/api.md: the entry of {name} must start with a python block naming it"
    prose = re.sub(r"```.+?```", "", entry, flags=re.S).strip()
    assert len(prose.split()) >= 15, f"docs/api.md: the entry of {name} needs a paragraph describing it"
    undocumented = [p for p in parameter_names(getattr(ders_peft, name)) if not re.search(rf"\b{p}\b", code[0])]
    assert not undocumented, f"docs/api.md: the signature of {name} lacks the parameters {undocumented}"
