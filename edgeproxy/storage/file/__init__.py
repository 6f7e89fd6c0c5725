"""``FileStorage``: the ``Storage`` protocol on a local directory tree (see ``storage``).

One module a job: ``atomic`` (whole writes, the guard), ``values``, ``leases`` (leases and
challenges), ``registry``, ``outbox``, ``due`` (the next-action index), ``records`` (their
formats), ``health`` (an unsafe root, modes, leftover temp files) and ``storage`` (the front).
"""

from edgeproxy.storage.file.health import root_problems
from edgeproxy.storage.file.storage import FileStorage

__all__ = ["FileStorage", "root_problems"]
