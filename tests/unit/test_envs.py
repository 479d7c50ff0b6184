import pathlib
import re

import pytest

from autoround import envs


def test_defaults_and_lazy_reading(monkeypatch):
    monkeypatch.delenv("AR_LOG_LEVEL", raising=False)
    assert envs.AR_LOG_LEVEL == "INFO"
    monkeypatch.setenv("AR_LOG_LEVEL", "debug")
    assert envs.AR_LOG_LEVEL == "DEBUG"  # read at access time, not import time
    monkeypatch.setenv("AR_DISABLE_OFFLOAD", "yes")
    assert envs.AR_DISABLE_OFFLOAD is True
    monkeypatch.setenv("AR_SEARCH_SCALE_RATIO", "0.5")
    assert envs.AR_SEARCH_SCALE_RATIO == 0.5


@pytest.mark.parametrize("name,value,valid", [
    ("AR_LOG_LEVEL", "LOUD", "one of TRACE, DEBUG, INFO"),
    ("AR_DISABLE_OFFLOAD", "maybe", "a boolean"),
    ("AR_SEARCH_SCALE_RATIO", "-1", "a positive number"),
    ("AR_DYNAMO_CACHE_SIZE_LIMIT", "x", "a positive integer"),
])
def test_invalid_values_name_the_variable(monkeypatch, name, value, valid):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}=.*invalid.*{valid}"):
        getattr(envs, name)


def test_set_config_and_is_set(monkeypatch):
    for name in ("AR_USE_MODELSCOPE", "AR_ACT_SCALE"):
        monkeypatch.delenv(name, raising=False)
    assert not envs.is_set("AR_USE_MODELSCOPE")
    envs.set_config(AR_USE_MODELSCOPE=True, AR_ACT_SCALE=2)
    try:
        assert envs.is_set("AR_USE_MODELSCOPE") and envs.AR_USE_MODELSCOPE is True
        assert envs.AR_ACT_SCALE == 2.0
        with pytest.raises(ValueError, match="AR_ACT_SCALE"):
            envs.set_config(AR_USE_MODELSCOPE=False, AR_ACT_SCALE="big")
        assert envs.AR_USE_MODELSCOPE is True  # nothing set when one value is invalid
        with pytest.raises(ValueError, match="unknown autoround environment variable 'AR_NOPE'"):
            envs.set_config(AR_NOPE=1)
    finally:
        envs.set_config(AR_USE_MODELSCOPE=None, AR_ACT_SCALE=None)
    assert not envs.is_set("AR_USE_MODELSCOPE")


def test_all_reference_variables_exist():
    for name in ("AR_LOG_LEVEL", "AR_WORK_SPACE", "AR_USE_MODELSCOPE", "AR_DISABLE_OFFLOAD",
                 "AR_DISABLE_DATASET_SUBPROCESS", "AR_ACT_SCALE", "AR_ENABLE_ACT_MINMAX_TUNING",
                 "AR_ENABLE_UNIFY_MOE_INPUT_SCALE", "AR_SEARCH_SCALE_RATIO", "AR_ENABLE_COMPILE_PACKING",
                 "AR_DYNAMO_CACHE_SIZE_LIMIT"):
        getattr(envs, name)


def test_no_other_module_reads_the_environment():
    import autoround

    roots = {pathlib.Path(autoround.__file__).parent}
    import autoround.backends
    import autoround.quantizer

    roots |= {pathlib.Path(autoround.quantizer.__file__).parent, pathlib.Path(autoround.backends.__file__).parent}
    offenders = []
    for root in roots:
        for f in root.rglob("*.py"):
            if f.name == "envs.py" and f.parent == pathlib.Path(autoround.__file__).parent:
                continue
            if re.search(r"os\.environ|os\.getenv|getenv\(", f.read_text()):
                offenders.append(str(f))
    assert offenders == []


def test_child_environment_sets_checked_values_for_a_subprocess_only(monkeypatch):
    from autoround import envs

    monkeypatch.setenv("AR_DISABLE_OFFLOAD", "1")
    env = envs.child_environment(AR_WORK_SPACE="/tmp/ws", AR_DISABLE_OFFLOAD=None, AR_LOG_LEVEL="DEBUG")
    assert env["AR_WORK_SPACE"] == "/tmp/ws" and env["AR_LOG_LEVEL"] == "DEBUG" and "AR_DISABLE_OFFLOAD" not in env
    assert envs.AR_DISABLE_OFFLOAD and not envs.is_set("AR_WORK_SPACE")  # this process's environment is unchanged
    with pytest.raises(ValueError, match="AR_DIST_TIMEOUT"):
        envs.child_environment(AR_DIST_TIMEOUT="soon")
