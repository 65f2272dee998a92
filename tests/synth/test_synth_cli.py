from avr_megatron.cli.commands import COMMANDS
from avr_megatron.cli.main import main


def test_synth_and_pairs_commands_are_registered():
    paths = {c.path for c in COMMANDS}
    assert {("synth", "stage1"), ("synth", "stage2"), ("synth", "thoughts"), ("pairs", "stage1"),
            ("pairs", "stage2")} <= paths


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    assert main(["pairs", "stage1", f"run.dir={tmp_path}"]) == 2
    assert "no synthesis output here" in capsys.readouterr().err
    assert main(["synth", "stage1", f"run.dir={tmp_path}", "synth.policy.model=x", "synth.reward.model=y"]) == 2
    assert "synth.input.path is not set" in capsys.readouterr().err
    assert main(["synth", "stage1", f"run.dir={tmp_path}", "synth.input.path=x.jsonl"]) == 2
    assert "synth.policy.model is not set" in capsys.readouterr().err
    assert main(["synth", "stage2", "--shard", "3/2", f"run.dir={tmp_path}"]) == 2
    assert "--shard '3/2'" in capsys.readouterr().err
