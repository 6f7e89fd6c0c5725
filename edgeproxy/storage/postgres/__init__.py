"""``PostgresStorage``: the ``Storage`` protocol on a PostgreSQL database shared by replicas.

One module a job: ``target`` (the DSN), ``schema`` (migrations), ``values``, ``leases`` (leases
bound to a database session, challenges), ``registry``, ``queues`` (event outbox, next-action
index), ``listener`` (the change channel and its LISTEN thread) and ``storage`` (the front).
The sealer is ``edgeproxy.storage.sealing``.
"""

from edgeproxy.storage.postgres.schema import MIGRATIONS
from edgeproxy.storage.postgres.storage import PostgresStorage
from edgeproxy.storage.sealing import generate_encryption_key

__all__ = ["MIGRATIONS", "PostgresStorage", "generate_encryption_key"]
