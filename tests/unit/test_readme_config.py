"""The README's configuration reference names every config key, and no key that does not exist.

Keys are read from the README's first TOML block, commented-out ones included (``# key = ...``);
a key is placed in the table whose header (``[x]``, ``[[x.y]]``, also commented) comes before it.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from edgeproxy.config import Config

#: Accepted by the config model but read by nothing: tls.key_type chooses the keys. Documenting
#: it would tell operators it does something; removing it would reject configs that set it.
UNDOCUMENTED = {"acme.key_type"}

_HEADER = re.compile(r"^(?:# )?\[\[?([a-z_.]+)\]\]?")
_KEY = re.compile(r"^(?:# )?([a-z_]+) = ")


def _model_keys(model: type[BaseModel], prefix: str, out: dict[str, bool]) -> None:
    for name, field in model.model_fields.items():
        sub = None
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                sub = arg
        out[prefix + name] = sub is not None
        if sub is not None:
            _model_keys(sub, f"{prefix}{name}.", out)


def _readme_sections() -> dict[str, str]:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("## Configuration reference", 1)[1].split("```toml", 1)[1]
    sections: dict[str, str] = {"": ""}
    table = ""
    for line in block.split("```", 1)[0].splitlines():
        if m := _HEADER.match(line.lstrip()):
            table = m.group(1)
            sections.setdefault(table, "")
        sections[table] += line + "\n"
    return sections


def test_every_documented_key_exists() -> None:
    keys = _model_keys_all()
    documented = [
        f"{table}.{m.group(1)}" if table else m.group(1)
        for table, text in _readme_sections().items()
        for line in text.splitlines()
        if (m := _KEY.match(line.lstrip()))
    ]
    assert documented
    assert [k for k in documented if k not in keys] == []


def test_every_key_is_documented() -> None:
    sections = _readme_sections()
    missing = []
    for key, is_table in _model_keys_all().items():
        if key in UNDOCUMENTED:
            continue
        table, _, leaf = key.rpartition(".")
        if is_table:
            found = key in sections
        else:
            # In its table, or (per-CA keys listed beside [[acme.issuers]]) in the parent's.
            texts = [sections.get(table, ""), sections.get(table.rpartition(".")[0], "")]
            found = any(re.search(rf"\b{leaf}\b", t) for t in texts)
        if not found:
            missing.append(key)
    assert missing == []


def _model_keys_all() -> dict[str, bool]:
    out: dict[str, bool] = {}
    _model_keys(Config, "", out)
    return out


def test_every_bound_is_documented() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    ranges = " ".join(readme.split("\nRanges (", 1)[1].split("\n\n", 1)[0].split())
    wrong = []
    for key, is_table in _model_keys_all().items():
        if is_table:
            continue
        bounds = {type(m).__name__: m for m in _field(key).metadata}
        if "Le" not in bounds:
            continue
        high = _num(bounds["Le"].le)
        if "Ge" in bounds:
            text = f"`{key}` {_num(bounds['Ge'].ge)}-{high}"
        else:
            assert bounds["Gt"].gt == 0, key  # the text says "above 0" for durations
            text = f"`{key}` up to {high}"
        if text not in ranges:
            wrong.append(text)
    assert wrong == []


def _field(key: str) -> typing.Any:
    model: type[BaseModel] = Config
    *tables, leaf = key.split(".")
    for table in tables:
        ann = model.model_fields[table].annotation
        model = next(
            a
            for a in (ann, *typing.get_args(ann))
            if isinstance(a, type) and issubclass(a, BaseModel)
        )
    return model.model_fields[leaf]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
