"""Reference log-probs are computed in bf16 when the policy trains in FP8 (a forward-only pass
never calibrates delayed-scaling scales), unless logps.fp8 asks for FP8; the store's stamp
records the precision."""

from types import SimpleNamespace

from avr_megatron.config import load_config
from avr_megatron.training import reference

FP8 = ["precision.bf16=true", "precision.fp8=e4m3"]


def test_reference_config_drops_fp8_unless_asked():
    cfg = load_config(None, FP8 + ["precision.fp8_param=true"])
    ref = reference.reference_config(cfg)
    assert ref.precision.fp8 is None and not ref.precision.fp8_param and ref.precision.bf16
    assert cfg.precision.fp8 == "e4m3" and cfg.precision.fp8_param  # the run's config untouched
    assert reference.reference_precision(cfg) == "bf16"
    asked = load_config(None, FP8 + ["logps.fp8=true"])
    assert reference.reference_config(asked) is asked
    assert reference.reference_precision(asked) == "bf16+fp8-e4m3-delayed"
    assert reference.reference_precision(load_config(None, [])) == "fp32"


def test_reference_model_is_built_without_fp8_and_stamped(monkeypatch):
    import avr_megatron.models.llama as llama
    import avr_megatron.runtime.distributed as distributed
    import avr_megatron.training.init as init

    built = {}
    monkeypatch.setattr(llama, "build_model", lambda c: built.setdefault("cfg", c) and [])
    monkeypatch.setattr(distributed, "seed_everything", lambda seed: None)
    monkeypatch.setattr(init, "load_initial_weights", lambda *a, **k: "random")
    cfg = load_config(None, FP8)
    reference.build_reference_model(cfg)
    assert built["cfg"].precision.fp8 is None and built["cfg"].precision.bf16

    data = type("Data", (), {"fingerprint": lambda self: "e", "__len__": lambda self: 3})()
    td = SimpleNamespace(tokenizer_fingerprint="t", files_fingerprint="f", data=data)
    layout = SimpleNamespace(tp=1, pp=1, dp=1)
    assert reference.make_stamp(cfg, td, layout)["precision"] == "bf16"
