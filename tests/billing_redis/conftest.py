"""Every Redis test of this package runs twice: against one Redis server and against a real
3-master Redis Cluster (tests/redis_cluster.py), through the client billing builds for the URL
(server/billing/redis_client.py: `redis+cluster://` is a cluster)."""

from __future__ import annotations

import pytest

from server.infra.embedded import Services
from tests.redis_cluster import session_cluster


@pytest.fixture(scope="session")
def redis_cluster_url(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> str:
    return session_cluster(request, tmp_path_factory).url


@pytest.fixture(params=["single", "cluster"])
def redis_url(request: pytest.FixtureRequest, services: Services) -> str:
    """Overrides the suite's `redis_url` for this package: one server, then the cluster."""
    if request.param == "single":
        return services.redis_url
    url: str = request.getfixturevalue("redis_cluster_url")
    return url
