"""The local executors run a stage's tasks and surface a failing task's error."""

import sys
from types import SimpleNamespace

import pytest

from avr_megatron.pipeline.executors import make_executor
from avr_megatron.pipeline.spec import StageFailed, StageSpec, StageTask


class _Cfg:
    class run:
        dir = None

    class parallel:
        tensor_model_parallel_size = pipeline_model_parallel_size = context_parallel_size = 1

    class pipeline:
        class envs:
            synth = train = SimpleNamespace(python=None, container_image=None)


@pytest.mark.parametrize("name", ["inline", "local"])
def test_failing_task_raises_with_its_log(tmp_path, name):
    cfg = _Cfg()
    cfg.run.dir = str(tmp_path)
    ok = StageTask("ok", ("info",))
    bad = StageTask("bad", ("pairs", "stage1", "--recipe", str(tmp_path / "missing.yaml")))
    spec = StageSpec("demo", (ok, bad), "cpu", tmp_path / "logs")
    with pytest.raises(StageFailed) as info:
        make_executor(name, cfg).run_stage(spec)
    e = info.value
    assert (e.stage, e.task) == ("demo", "bad") and e.returncode not in (0, None)
    assert "missing.yaml" in e.log_tail and e.log_path == tmp_path / "logs" / "bad.log"
    assert "torch" in (tmp_path / "logs" / "ok.log").read_text()  # `avr info` ran and logged


def test_unknown_executor_is_named():
    with pytest.raises(KeyError, match="unknown executor 'k8s'"):
        make_executor("k8s", _Cfg())
