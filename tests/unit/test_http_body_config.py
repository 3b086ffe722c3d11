"""`server.http_body_timeout_s`: documented default, env override, refused when not positive."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_config
from server.flow_control.http_body import DEFAULT_BODY_TIMEOUT_S


def test_default_is_the_flow_control_bound() -> None:
    assert load_config(environ={}).server.http_body_timeout_s == DEFAULT_BODY_TIMEOUT_S == 30.0


def test_env_overrides_it() -> None:
    env = {"STREAMGATE_SERVER__HTTP_BODY_TIMEOUT_S": "1.5"}
    assert load_config(environ=env).server.http_body_timeout_s == 1.5


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_timeout_that_is_not_positive_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.http_body_timeout_s must be positive"):
        load_config(environ={"STREAMGATE_SERVER__HTTP_BODY_TIMEOUT_S": value})
