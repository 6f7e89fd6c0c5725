"""The cluster the tests in this folder share, started once per module (``testkit.cluster``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit import postgres as pg
from testkit.cluster import Cluster, start_cluster

postgres_server = pg.postgres_server


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: pg.PostgresServer
) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("cluster"), postgres_server) as c:
        yield c
