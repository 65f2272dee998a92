"""The runner's decisions with a fake executor (no processes): skip when up to date, resume an
interrupted stage in place, start a changed stage fresh, stop on a failed one."""

import io
from pathlib import Path

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.pipeline import runner
from avr_megatron.pipeline.manifest import Manifest
from avr_megatron.pipeline.spec import StageFailed

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
STAGE = "stage1_pairs_base"
CALLS: list[str] = []
FAIL: list[bool] = []


class FakeExecutor:
    """Writes what `avr pairs stage1` would (one file per output dataset), or fails."""

    def __init__(self, cfg):
        self.cfg = cfg

    def dryrun(self, spec):
        return f"# {spec.name}: would run"

    def run_stage(self, spec):
        CALLS.append(spec.name)
        if FAIL:
            raise StageFailed(spec.name, "main", 2, "boom: bad record")
        root = Path(self.cfg.run.dir) / "data" / "base" / "stage1"
        for d in ("sft", "preference"):
            (root / d).mkdir(parents=True, exist_ok=True)
            (root / d / "train.parquet").write_text(f"{d} {self.cfg.synth.output_format}")


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "make_executor", lambda name, cfg: FakeExecutor(cfg))
    base = tmp_path / "base"
    base.mkdir()
    CALLS.clear()
    FAIL.clear()

    def go(*overrides, force=False):
        cfg = load_config(TINY, [f"run.dir={tmp_path}", f"pipeline.base_model={base}",
                                 f"synth.reward.model={base}", "pipeline.make_tiny_models=false",
                                 *overrides])
        out = io.StringIO()
        code = runner.run_pipeline(cfg, only=STAGE, executor="fake", out=out, force=force)
        return code, out.getvalue(), Manifest(tmp_path / "pipeline.json").entry(STAGE)

    return go, tmp_path


def test_skip_resume_fresh_and_failure(run):
    go, root = run
    code, out, entry = go()
    assert code == 0 and CALLS == [STAGE] and entry["status"] == "done"
    assert set(entry["outputs"]) == {str(root / "data/base/stage1/sft"), str(root / "data/base/stage1/preference")}

    code, out, _ = go()
    assert code == 0 and CALLS == [STAGE] and "up to date, skipped" in out

    marker = root / "stages" / STAGE / "leftover-from-last-run"
    marker.write_text("x")
    FAIL.append(True)  # a changed config: starts fresh, then fails
    code, out, entry = go("synth.output_format=jsonl")
    assert code == 1 and entry["status"] == "failed" and "boom" in entry["error"]
    assert not marker.exists() and not (root / "data/base/stage1/sft").exists()

    marker.write_text("x")
    FAIL.clear()  # same config after a failure: resumes in place
    code, out, entry = go("synth.output_format=jsonl")
    assert code == 0 and entry["status"] == "done" and marker.exists()
    assert (root / "data/base/stage1/sft/train.parquet").read_text() == "sft jsonl"


def test_force_redoes_a_finished_stage_from_scratch(run):
    go, root = run
    assert go()[0] == 0
    marker = root / "stages" / STAGE / "leftover-from-last-run"
    marker.write_text("x")
    code, out, entry = go(force=True)
    assert code == 0 and CALLS == [STAGE, STAGE] and "--force" in out and not marker.exists()


def test_missing_base_model_stops_before_any_stage(run, tmp_path):
    go, root = run
    with pytest.raises(ConfigError, match="pipeline.base_model=.*not found"):
        go(f"pipeline.base_model={tmp_path / 'nowhere'}")
    assert CALLS == []


def test_where_a_stage_runs_is_not_part_of_its_fingerprint(run):
    """Moving to another environment, executor or partition does not redo finished work."""
    go, root = run
    assert go()[0] == 0
    code, out, _ = go("pipeline.envs.synth.container_image=/images/synth.sqsh",
                      "launch.slurm.cpu.time='2:00:00'")
    assert code == 0 and CALLS == [STAGE] and "up to date, skipped" in out


def test_environment_without_the_role_packages_is_named(run, tmp_path):
    """Each role's interpreter is asked for its packages before the first stage: a Python
    without them stops the run naming pipeline.envs.<role>.python."""
    go, root = run
    with pytest.raises(ConfigError) as e:
        go("pipeline.envs.synth.python=/bin/false")
    assert "pipeline.envs.synth.python=/bin/false is not a synth environment" in str(e.value)
    assert "requirements/synth.txt" in str(e.value) and CALLS == []


def test_placeholders_refused_before_any_stage_and_listed_by_a_dry_run(run):
    go, root = run
    with pytest.raises(ConfigError, match=r"placeholder values .*synth\.input\.path=/path/to/x"):
        go("synth.input.path=/path/to/x.jsonl", "launch.slurm.account=YOUR_ACCOUNT")
    assert CALLS == []
    # launch.* placeholders only matter to the slurm executor
    cfg = load_config(TINY, [f"run.dir={root}", f"pipeline.base_model={root / 'base'}",
                             "launch.slurm.account=YOUR_ACCOUNT", "eval.prompts=/path/to/e.jsonl"])
    out = io.StringIO()
    assert runner.run_pipeline(cfg, only=STAGE, executor="fake", dryrun=True, out=out) == 0
    text = out.getvalue()
    assert "WARNING: placeholder eval.prompts=/path/to/e.jsonl" in text
    assert "YOUR_ACCOUNT" not in text and "## stage stage1_pairs_base" in text


def test_model_hook_makes_the_models_and_the_pipeline_imports_no_test_helpers(run, tmp_path):
    """pipeline.make_tiny_models runs the hook its caller passes (`avr pipeline`: the tiny-model
    maker of avr_megatron.testing, chosen in avr_megatron/cli/pipeline.py) before the first stage;
    without one it is refused. No module of the pipeline package imports avr_megatron.testing."""
    import ast

    go, root = run
    base = root / "made-by-hook"
    cfg = load_config(TINY, [f"run.dir={root}", f"pipeline.base_model={base}",
                             "pipeline.make_tiny_models=true"])
    with pytest.raises(ConfigError, match="no prepare_models hook"):
        runner.run_pipeline(cfg, only=STAGE, executor="fake", out=io.StringIO())
    assert CALLS == []
    made = []
    code = runner.run_pipeline(cfg, only=STAGE, executor="fake", out=io.StringIO(),
                               prepare_models=lambda c: (made.append(c), base.mkdir()))
    assert code == 0 and made == [cfg] and CALLS == [STAGE]
    package = Path(runner.__file__).parent
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith("avr_megatron.testing")], module
