import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.engines.factory import build_chat_engine, build_reward_engine


def test_missing_model_and_server_address_are_config_errors():
    cfg = load_config(None)
    with pytest.raises(ConfigError, match=r"synth.policy.model is not set"):
        build_chat_engine(cfg.synth.policy, 0)
    cfg = load_config(None, ["synth.reward.backend=server", "synth.reward.model=rm"])
    with pytest.raises(ConfigError, match=r"synth.reward.base_url is not set"):
        build_reward_engine(cfg.synth.reward, 0)


def test_backends_from_the_recipe(tiny_models):
    cfg = load_config(None, [f"synth.policy.model={tiny_models[0]}", "synth.policy.name=tiny", "synth.policy.device=cpu",
                             "synth.reward.backend=server", "synth.reward.model=rm",
                             "synth.reward.base_url=http://127.0.0.1:8000/v1"])
    chat = build_chat_engine(cfg.synth.policy, 0)
    assert type(chat).__name__ == "TransformersChatEngine" and chat.name == "tiny"
    rm = build_reward_engine(cfg.synth.reward, 0)
    assert type(rm).__name__ == "ServerRewardEngine" and rm.client.root == "http://127.0.0.1:8000"


def test_synth_config_rules():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["synth.policy.backend=tgi", "synth.stage2.beam_width=0", "synth.thoughts.num_samples=1",
                           "synth.sampling.temperature=-1", "synth.reward.base_url=localhost:8000"])
    msg = str(e.value)
    for key in ("synth.policy.backend", "synth.stage2.beam_width", "synth.thoughts.num_samples",
                "synth.sampling.temperature", "synth.reward.base_url"):
        assert key in msg


def test_server_policy_decodes_locally_when_the_served_model_is_a_local_directory(tiny_models):
    served = ["synth.policy.backend=server", "synth.policy.base_url=http://127.0.0.1:8000"]
    local = build_chat_engine(load_config(None, [*served, f"synth.policy.model={tiny_models[0]}"]).synth.policy, 0)
    assert local.tokenizer_path == tiny_models[0]
    remote = build_chat_engine(load_config(None, [*served, "synth.policy.model=served-name"]).synth.policy, 0)
    assert remote.tokenizer_path is None
