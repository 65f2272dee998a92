"""docs/recipe_reference.md is generated from the schema's comments: it must be current, every
field must have a comment, and the parser must attach comments to the right fields."""

from __future__ import annotations

import dataclasses

from avr_megatron.config import reference, schema
from avr_megatron.config.reference import COMMAND, DOC_PATH, field_docs, missing_comments, render


def test_every_schema_field_has_a_comment():
    missing = missing_comments()
    assert not missing, ("schema fields without a comment (add one above the field in "
                         "avr_megatron/config/schema.py, then run `" + COMMAND + "`):\n  "
                         + "\n  ".join(missing))


def test_committed_reference_is_current():
    assert DOC_PATH.is_file() and DOC_PATH.read_text() == render(), (
        f"{DOC_PATH.name} is out of date: run `{COMMAND}` (or scripts/recipe_reference)")


def test_every_key_is_in_the_reference():
    text = render()
    for path, cls, _ in reference._sections():
        assert f"## {path}\n" in text
        for f in dataclasses.fields(cls):
            assert f"| `{path}.{f.name}` |" in text


SOURCE = '''
from dataclasses import dataclass

@dataclass
class A:
    """Section docstring, not a field comment."""

    # Two lines
    # above.
    x: int = 1
    y: str = "a # not a comment"  # trailing
    z: int = 0

    # separated by a blank line
    w: int = 2
'''


def test_parser_attaches_comments_to_fields():
    docs = field_docs(SOURCE)["A"]
    assert docs["x"].comment == "Two lines above."
    assert docs["y"].comment == "trailing"
    assert docs["z"].comment == ""
    assert docs["w"].comment == "separated by a blank line"


def test_defaults_and_types_come_from_the_dataclasses():
    text = render()
    assert "| `launch.slurm.cpu.gpus_per_node` | `int` | `0` |" in text
    assert "| `launch.slurm.train.gpus_per_node` | `int` | `8` |" in text
    assert "| `synth.sampling.temperature` | `float` | `0.7` |" in text
    assert "| `model.kv_channels` | `Optional[int]` | `null` |" in text
    # a pipe inside a comment is escaped so the table keeps its columns
    assert "none \\| margin" in text
    assert schema.SlurmResourcesConfig.__doc__.split()[0] in text


def test_check_mode_reports_stale_file(tmp_path, capsys):
    out = tmp_path / "ref.md"
    assert reference.main(["--check", "--output", str(out)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert reference.main(["--output", str(out)]) == 0
    assert reference.main(["--check", "--output", str(out)]) == 0


def test_a_field_without_comment_is_reported():
    source = reference.SCHEMA_PATH.read_text()
    line = "    # Run name shown in logs, TensorBoard and W&B.\n"
    assert line in source
    missing = missing_comments(field_docs(source.replace(line, "")))
    assert len(missing) == 1 and missing[0].startswith("RunConfig.name (schema.py:")
