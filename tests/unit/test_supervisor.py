"""The supervisor's pure parts: restart backoff, the shared worker configuration, sizing."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import load_config
from server.infra.stores import BillingUrls
from server.supervisor.cores import available_cores, worker_count
from server.supervisor.restart_backoff import RestartBackoff
from server.supervisor.worker_config import (
    read_worker_config,
    shared_worker_config,
    write_worker_config,
)

E2E_CONFIG = Path(__file__).resolve().parent.parent / "e2e" / "server.toml"


def test_backoff_restarts_at_once_then_doubles_up_to_the_cap() -> None:
    backoff = RestartBackoff(first_delay_s=0.5, max_delay_s=4.0, stable_after_s=30.0)
    delays = [backoff.delay_after(ran_for_s=1.0) for _ in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_forgets_failures_after_a_worker_ran_long_enough() -> None:
    backoff = RestartBackoff(first_delay_s=0.5, max_delay_s=4.0, stable_after_s=30.0)
    for _ in range(4):
        backoff.delay_after(ran_for_s=0.2)
    assert backoff.delay_after(ran_for_s=30.0) == 0.0
    assert backoff.delay_after(ran_for_s=0.2) == 0.5


def test_worker_count_prefers_the_flag_then_the_config_then_the_cores() -> None:
    assert worker_count(3, 2) == 3
    assert worker_count(None, 2) == 2
    assert worker_count(None, 0) == available_cores() >= 1


def test_workers_get_the_supervisors_configuration_with_what_it_made(tmp_path: Path) -> None:
    cfg = load_config(E2E_CONFIG, environ={"STREAMGATE_BILLING__ENABLED": "true"})
    urls = BillingUrls("redis://127.0.0.1:1/0", "postgresql://u@127.0.0.1:2/db", None)
    shared = shared_worker_config(cfg, ws_port=4001, http_port=4002, admin_token="tok",
                                  urls=urls)
    path = tmp_path / "config.json"
    write_worker_config(shared, path)
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the admin token
    back = read_worker_config(path)
    assert back == shared  # tagged engine configs and all
    assert (back.server.ws_port, back.server.http_port, back.server.workers) == (4001, 4002, 1)
    assert (back.billing.admin_token, back.billing.redis_url) == ("tok", urls.redis_url)
    assert back.asr == cfg.asr and back.tts == cfg.tts
    with pytest.raises(FileExistsError):  # never written over (O_EXCL)
        write_worker_config(shared, path)
