import pytest

from avr_megatron.config import ConfigError, load_config, save_config
from avr_megatron.config.schema import AvrConfig


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides():
    cfg = load_config(None, ["model.num_layers=4", "run.seed=7"])
    assert isinstance(cfg, AvrConfig)
    assert cfg.model.num_layers == 4 and cfg.run.seed == 7


def test_inheritance_and_preset(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  preset: llama3.1-8b\nrun:\n  seed: 3\n")
    child = write(tmp_path, "child.yaml", "defaults: base.yaml\nmodel:\n  num_layers: 8\n")
    cfg = load_config(child, [])
    assert cfg.model.hidden_size == 4096 and cfg.model.num_layers == 8 and cfg.run.seed == 3
    assert cfg.model.rope_scaling.type == "llama3"


def test_unknown_key_names_key_and_suggests(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_layer'.*model.num_layers"):
        load_config(bad, [])
    with pytest.raises(ConfigError, match=r"command line: unknown key 'parallel.tp'"):
        load_config(None, ["parallel.tp=2"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, ["model.num_layers=many"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.num_layers"])


def test_missing_parent_and_cycle(tmp_path):
    a = write(tmp_path, "a.yaml", "defaults: nope.yaml\n")
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(a, [])
    write(tmp_path, "x.yaml", "defaults: y.yaml\n")
    y = write(tmp_path, "y.yaml", "defaults: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(y, [])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="model.preset.*llama9"):
        load_config(None, ["model.preset=llama9"])


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "parallel.tensor_model_parallel_size=2"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path, [])
    assert again == cfg


def test_saved_config_is_readable_by_others(tmp_path):
    """config.yaml files (runs and checkpoints) follow the umask like any file: 0644 under 022,
    not mkstemp's 0600; nothing else is left in the directory."""
    import os
    import stat

    from avr_megatron.config import save_config

    old = os.umask(0o022)
    try:
        path = save_config(load_config(None, []), tmp_path / "run" / "config.yaml")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
