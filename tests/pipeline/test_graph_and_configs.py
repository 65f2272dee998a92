"""Stage graph, per-stage configs and the manifest's skip logic: no processes, milliseconds."""

from pathlib import Path

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.pipeline.graph import STAGE_NAMES, select
from avr_megatron.pipeline.manifest import Manifest
from avr_megatron.pipeline.runner import stage_spec
from avr_megatron.pipeline.stage_configs import plan_stages

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"


def test_stage_order_follows_the_method():
    assert STAGE_NAMES[0] == "stage1_trees_base" and STAGE_NAMES[-1] == "eval"
    order = {n: i for i, n in enumerate(STAGE_NAMES)}
    for before, after in [("rsft", "stage1_trees"), ("stage1_ref_logps", "stage1_dpo"),
                          ("stage1_dpo", "stage2_search"), ("thought_sft", "stage2_thoughts"),
                          ("stage2_pairs", "lcdpo_ref_logps"), ("lcdpo", "eval")]:
        assert order[before] < order[after]


def test_select_partial_runs():
    assert [s.name for s in select(only="rsft")] == ["rsft"]
    assert [s.name for s in select(start="lcdpo")] == ["lcdpo", "eval"]
    assert [s.name for s in select(stop="stage1_pairs_base")] == ["stage1_trees_base", "stage1_pairs_base"]
    with pytest.raises(ValueError, match="--from 'nope' is not a pipeline stage"):
        select(start="nope")
    with pytest.raises(ValueError, match="--only cannot be combined"):
        select(start="rsft", only="rsft")


def test_stage_configs_are_wired_and_overridden(tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "pipeline.stages.rsft.optimizer.lr=0.5"])
    plans = {p.stage.name: p for p in plan_stages(cfg)}
    assert len(plans) == len(STAGE_NAMES)
    base = str(tmp_path / "models" / "tiny-policy")
    rsft = plans["rsft"].cfg
    assert rsft.model.init_from.hf == base and rsft.data.tokenizer == base
    assert rsft.data.train == str(tmp_path / "data" / "base" / "stage1" / "sft")
    assert rsft.checkpoint.export_hf == str(tmp_path / "models" / "rsft")
    assert rsft.optimizer.lr == 0.5 and plans["stage1_dpo"].cfg.optimizer.lr != 0.5
    assert rsft.run.dir == str(tmp_path / "stages" / "rsft")
    # On-policy trees use the RSFT export; DPO and its reference log-probs agree on data and model.
    assert plans["stage1_trees"].cfg.synth.policy.model == str(tmp_path / "models" / "rsft")
    logps, dpo = plans["stage1_ref_logps"].cfg, plans["stage1_dpo"].cfg
    assert logps.data.train == dpo.data.train and logps.model.init_from.hf == dpo.model.init_from.hf
    assert logps.train.seq_length == dpo.train.seq_length
    assert plans["stage2_thoughts"].cfg.synth.output_dir == plans["stage2_search"].cfg.synth.output_dir
    ev = plans["eval"].cfg.eval
    assert ev.model == str(tmp_path / "models" / "lcdpo") and ev.baseline_model == base and ev.long_thought
    # Resolved once (config/resolve.py): the stage configs are read-only.
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError, match="train.train_iters"):
        rsft.train.train_iters = 3
    assert cfg.pipeline.stages["rsft"]["optimizer"]["lr"] == 0.5 and cfg.run.dir == str(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("pipeline.stages.rsft_typo.train.train_iters=3", "unknown stage"),
    ("pipeline.stages.rsft.train.no_such_key=3", "no_such_key"),
    ("pipeline.stages.lcdpo.parallel.tensor_model_parallel_size=3", "stage lcdpo"),
])
def test_bad_stage_overrides_fail_before_anything_runs(tmp_path, override, message):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=message):
        plan_stages(cfg)
    assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize("override, wired", [
    ("pipeline.stages.stage1_dpo.loss.reference=online", "loss.reference='precomputed'"),
    ("pipeline.stages.rsft.data.train=/elsewhere/sft", "data.train="),
    ("pipeline.stages.rsft.model.init_from.mcore=/some/ckpt", "model.init_from.mcore=None"),
    ("pipeline.stages.stage1_trees.synth.output_dir=/elsewhere", "synth.output_dir="),
    # The reference log-probs stage shares its DPO stage's overrides, conflicts included.
    ("pipeline.stages.lcdpo.data.train=/elsewhere/pairs", "for stage lcdpo_ref_logps"),
])
def test_override_of_a_wired_key_is_refused_naming_both(tmp_path, override, wired):
    """Wiring used to replace such an override silently: now the run stops before any stage,
    naming the user's value and the wired one."""
    key, value = override.split("=", 1)
    key = key.split(".", 3)[3]
    with pytest.raises(ConfigError, match="pipeline connects its stages") as e:
        plan_stages(load_config(TINY, [f"run.dir={tmp_path}", override]))
    assert f"sets {key}={value!r}, but the pipeline wires" in str(e.value) and wired in str(e.value)
    assert not (tmp_path / "stages").exists()


def test_override_equal_to_the_wiring_is_accepted(tmp_path):
    train = tmp_path / "data" / "base" / "stage1" / "sft"
    cfg = load_config(TINY, [f"run.dir={tmp_path}", f"pipeline.stages.rsft.data.train={train}",
                             "pipeline.stages.stage1_dpo.loss.reference=precomputed",
                             "pipeline.stages.rsft.model.init_from.mcore=null"])
    plans = {p.stage.name: p for p in plan_stages(cfg)}
    assert plans["rsft"].cfg.data.train == str(train)
    assert plans["stage1_dpo"].cfg.loss.reference == "precomputed"


def test_stage2_start_without_a_chosen_column_fails_before_anything_runs(tmp_path):
    no_chosen = [f"run.dir={tmp_path}", "synth.input.fields.chosen=null", "synth.pairs.mix_source_chosen=false"]
    with pytest.raises(ConfigError, match=r"stage stage2_search .*synth.stage2.start=chosen.*fields.chosen is not set"):
        plan_stages(load_config(TINY, no_chosen))
    assert not (tmp_path / "stages").exists()
    plans = {p.stage.name: p for p in plan_stages(load_config(TINY, [*no_chosen, "synth.stage2.start=sample"]))}
    assert plans["stage2_search"].cfg.synth.stage2.start == "sample"
    # Per stage: only the search needs the chosen answers.
    plan_stages(load_config(TINY, [*no_chosen, "pipeline.stages.stage2_search.synth.stage2.start=sample"]))


def test_missing_base_model_is_named(tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "pipeline.base_model=null"])
    with pytest.raises(ConfigError, match="pipeline.base_model"):
        plan_stages(cfg)


def test_synthesis_fans_out_over_shards(tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "pipeline.synth_shards=3"])
    plans = {p.stage.name: p for p in plan_stages(cfg)}
    spec = stage_spec(plans["stage2_search"], 3)
    assert [t.argv[-1] for t in spec.tasks] == ["0/3", "1/3", "2/3"] and spec.resources == "synth"
    train = stage_spec(plans["rsft"], 3)
    assert len(train.tasks) == 1 and train.tasks[0].distributed and train.resources == "train"


def test_manifest_skip_logic(tmp_path):
    out = tmp_path / "out.txt"
    m = Manifest(tmp_path / "pipeline.json")
    assert m.is_current("s", "c1", {"a": "x"}, [out]) == (False, "last status never run")
    m.start("s", "c1", {"a": "x"})
    m.finish("s", "done", {str(out): "f"}, {"rows": 3})
    assert m.is_current("s", "c1", {"a": "x"}, [out])[1].startswith("outputs missing")
    out.write_text("done")
    reloaded = Manifest(tmp_path / "pipeline.json")
    assert reloaded.is_current("s", "c1", {"a": "x"}, [out]) == (True, "up to date")
    assert reloaded.is_current("s", "c2", {"a": "x"}, [out]) == (False, "its config changed")
    assert reloaded.is_current("s", "c1", {"a": "y"}, [out]) == (False, "inputs changed: a")
    m.start("s", "c1", {"a": "x"})  # a rerun that is interrupted is not current
    assert not Manifest(tmp_path / "pipeline.json").is_current("s", "c1", {"a": "x"}, [out])[0]


def test_stage_facts_live_in_the_records_not_in_names(tmp_path, monkeypatch):
    """Every stage renamed and its command made opaque: the planned configs, inputs, outputs and
    owned directories are the same up to the names, and the stage-2 start check still applies,
    so no module special-cases a stage by its name or its command."""
    from dataclasses import replace

    from avr_megatron.pipeline import graph, stage_configs

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "pipeline.stages.stage1_dpo.loss.beta=0.3",
                             "synth.pairs.valid_fraction=0.2"])
    before = plan_stages(cfg)
    new = {n: f"renamed-{n}" for n in STAGE_NAMES}

    def renamed(s):
        return replace(s, name=new[s.name], command=("cmd", new[s.name]),
                       model_from=new.get(s.model_from, s.model_from),
                       reference_for=new.get(s.reference_for, s.reference_for),
                       baseline_from=new.get(s.baseline_from, s.baseline_from))

    stages = tuple(renamed(s) for s in graph.STAGES)
    monkeypatch.setattr(stage_configs, "STAGES", stages)
    monkeypatch.setattr(stage_configs, "BY_NAME", {s.name: s for s in stages})
    monkeypatch.setattr(stage_configs, "REFERENCE_OF", {s.reference_for: s for s in stages if s.reference_for})
    cfg.pipeline.stages = {new[name]: layer for name, layer in cfg.pipeline.stages.items()}
    after = plan_stages(cfg)

    def text(plan):
        from omegaconf import OmegaConf

        c = OmegaConf.to_container(OmegaConf.structured(plan.cfg))
        c["pipeline"]["stages"] = {}
        return repr((OmegaConf.to_yaml(c), plan.inputs, plan.outputs, plan.owns, plan.export)).replace("renamed-", "")

    assert [text(p) for p in after] == [text(p) for p in before]
    assert after[6].cfg.loss.beta == after[5].cfg.loss.beta == 0.3  # the DPO stage and its log-probs
    assert after[6].cfg.loss.reference == "precomputed" and after[-1].cfg.eval.long_thought
    cfg.synth.input.fields.chosen, cfg.synth.pairs.mix_source_chosen = None, False
    with pytest.raises(ConfigError, match="stage renamed-stage2_search .*synth.stage2.start=chosen"):
        plan_stages(cfg)


def test_each_stage_summary_reads_what_its_command_wrote(tmp_path):
    """The final table's figures, read by the stage record's `summary` from where each command
    (taken from the record's command line here) writes them."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from avr_megatron.pipeline.summaries import READERS, stage_summary
    from avr_megatron.synth.driver import pass_dir
    from avr_megatron.synth.pairs import data_root

    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    expected = {
        "synth": ({"prompts": 3, "trees": 6, "mean_gain_round1": 0.25},
                  {"summary": {"prompts": 3, "trees": 6, "gain_sum": {"1": 0.5}, "gain_count": {"1": 2}}}),
        "pairs": ({"sft_rows": 4}, {"outputs": {"sft": {"rows": 4}}}),
        "train": ({"iterations": 6, "loss": 0.1235}, {"iteration": 6, "last": {"loss": 0.123456}}),
        "logps": ({"pairs": 2}, None),
        "eval": ({"rounds": 1, "reward_r0": 0.1, "reward_r1": 0.3, "win_rate": 0.6, "malformed": 0},
                 {"table": [{"round": 0, "mean_reward": {"mean": 0.1}},
                            {"round": 1, "mean_reward": {"mean": 0.3}, "win_rate": {"rate": 0.6}, "malformed": 0}]}),
    }
    plans = plan_stages(load_config(TINY, [f"run.dir={tmp_path}"]))
    for p in plans:
        command, c = p.stage.command, p.cfg
        content = expected[command[0]][1]
        if command[0] == "synth":
            write(pass_dir(c, command[1]) / "summary.json", content)
        elif command[0] == "pairs":
            write(data_root(c) / command[1] / "summary.json", content)
        elif command[0] == "train":
            write(Path(c.run.dir) / "train_summary.json", content)
        elif command[0] == "logps":
            store = Path(c.data.train + ".ref_logps")
            store.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"id": ["a", "b"]}), store / "logps.parquet")
        else:
            write(Path(c.run.dir) / "eval" / "results.json", content)
    for p in plans:
        assert p.stage.summary in READERS, p.stage.name
        assert stage_summary(p) == expected[p.stage.command[0]][0], p.stage.name
    # A synthesis stage's pass is the one its command writes.
    assert all(p.stage.command == ("synth", p.stage.writes_pass) for p in plans if p.stage.writes_pass)


def test_held_out_splits_become_the_training_stages_validation_data(tmp_path):
    plain = {p.stage.name: p for p in plan_stages(load_config(TINY, [f"run.dir={tmp_path}"]))}
    assert all(p.cfg.data.valid is None for p in plain.values())  # default: as before, no validation
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "synth.pairs.valid_fraction=0.2"])
    plans = {p.stage.name: p for p in plan_stages(cfg)}
    for name, dataset in [("rsft", "base/stage1/sft"), ("stage1_ref_logps", "onpolicy/stage1/preference"),
                          ("stage1_dpo", "onpolicy/stage1/preference"), ("thought_sft", "thought_sft/stage2/sft"),
                          ("lcdpo", "lcdpo/stage2/preference")]:
        c = plans[name].cfg
        assert c.data.train == str(tmp_path / "data" / dataset)
        assert c.data.valid == c.data.train + "_valid" and Path(c.data.valid) in plans[name].inputs
    valid_store = Path(plans["stage1_dpo"].cfg.data.valid + ".ref_logps") / "logps.parquet"
    assert valid_store in plans["stage1_ref_logps"].outputs and valid_store in plans["stage1_dpo"].inputs
    assert tmp_path / "data" / "onpolicy" / "stage1" / "preference_valid" in plans["stage1_pairs"].outputs
    with pytest.raises(ConfigError, match="pipeline.stages.stage1_pairs sets synth.pairs.valid_fraction"):
        plan_stages(load_config(TINY, [f"run.dir={tmp_path}",
                                       "pipeline.stages.stage1_pairs.synth.pairs.valid_fraction=0.5"]))
    with pytest.raises(ConfigError, match="pipeline wires data.valid"):
        plan_stages(load_config(TINY, [f"run.dir={tmp_path}", "synth.pairs.valid_fraction=0.2",
                                       "pipeline.stages.rsft.data.valid=/elsewhere"]))
