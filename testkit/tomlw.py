"""Write the config shapes edgeproxy uses as TOML (tables of scalars/lists/sub-tables, arrays of
tables)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # a sub-table (``[acme.limits]``), written inline
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(cfg: Mapping[str, Any]) -> str:
    """The config shapes edgeproxy uses: tables of scalars/lists, arrays of tables."""
    lines: list[str] = []
    for section, body in cfg.items():
        tables = body if isinstance(body, list) else [body]
        header = f"[[{section}]]" if isinstance(body, list) else f"[{section}]"
        for table in tables:
            lines.append(header)
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
            lines.append("")
    return "\n".join(lines)
