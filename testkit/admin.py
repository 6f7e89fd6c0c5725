"""What the admin app reads from a running proxy, as a plain value the admin tests set."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProxyState:
    """The proxy's side of the admin app: draining or not, and the addresses it listens on."""

    draining: bool = False
    bound: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 8443)])
