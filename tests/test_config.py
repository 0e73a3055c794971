"""Session settings: defaults, validation and how they reach the functions."""

from __future__ import annotations

import pytest

import spear_nb
from spear_nb import ConfigurationError, SessionConfig
from tests import _remote


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_instances_per_task": 0},
        {"max_concurrency_per_instance": 0},
        {"execution_timeout": 0},
        {"instance_start_timeout": -1},
        {"health_check_interval": 0},
        {"max_frame_size": 0},
        {"max_frame_size": 10},  # no instance could start: refused up front
        {"max_frame_size": 2**40},  # more than a gRPC message or a frame can hold
        {"queue_policy": "sometimes"},
        {"scheduler": "coin_flip"},
    ],
)
def test_bad_values_are_configuration_errors(kwargs) -> None:
    (name,) = kwargs
    with pytest.raises(ConfigurationError, match=name) as info:
        SessionConfig(**kwargs)
    assert isinstance(info.value, spear_nb.SpearError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigurationError, match=name):
        spear_nb.Session(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_instances_per_task": "3"}, id="str-int"),
        pytest.param({"execution_timeout": None}, id="none-timeout"),
        pytest.param({"stop_grace": -1.0}, id="negative-grace"),
        pytest.param({"max_queue": -5}, id="negative-queue"),
    ],
)
def test_wrongly_typed_or_negative_values_are_configuration_errors(kwargs) -> None:
    with pytest.raises(ConfigurationError):
        SessionConfig(**kwargs)


@pytest.mark.parametrize("make", [spear_nb.Session, SessionConfig])
@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("max_instances_pre_task", "max_instances_per_task"),
        ("timout", "execution_timeout"),
        ("heartbeat_intervall", "heartbeat_interval"),
    ],
)
def test_a_mistyped_setting_names_the_closest_real_one(make, typo, meant) -> None:
    with pytest.raises(ConfigurationError) as info:
        make(**{typo: 3})
    assert f"{typo!r} (did you mean {meant!r}?)" in str(info.value)
    assert "stop_grace" in str(info.value)  # and the whole list


def test_config_and_keywords_together() -> None:
    with pytest.raises(ConfigurationError, match="either"):
        spear_nb.Session(SessionConfig(), stop_grace=1.0)


def test_config_object_is_used() -> None:
    config = SessionConfig(
        stop_grace=0.5, execution_timeout=12.0, max_instances_per_task=3
    )
    with spear_nb.Session(config) as s:
        assert s.config is config
        s.register("inc", _remote.inc)
        info = s.inspect("inc")
        assert info["setting.timeout"] == 12.0
        assert info["setting.max_instances"] == 3
        s.register("inc5", _remote.inc, timeout=5.0, max_instances=1)
        info = s.inspect("inc5")
        assert info["setting.timeout"] == 5.0
        assert info["setting.max_instances"] == 1
        assert s.invoke("inc5", 1) == 2


def test_register_with_a_wrongly_typed_timeout(session) -> None:
    with pytest.raises(spear_nb.InvalidSpec):
        session.register("inc", _remote.inc, timeout="1")
