"""Transformer Engine FP8 extra state is loaded without running code: a delayed-scaling payload
(pickled as TE 2.20 pickles it) is decoded with a restricted unpickler, re-encoded and handed to
TE with its unsafe-pickle flag set only for that load; anything else is refused before it runs."""

import io
import os
import pickle

import pytest
import torch

from avr_megatron.checkpoint import extra_state
from avr_megatron.testing import te_layout


@pytest.fixture
def te_recipe():
    added = te_layout.install_recipe_stand_ins()
    yield
    te_layout.remove_recipe_stand_ins(added)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_delayed_scaling_state_is_decoded_and_reencoded(te_recipe):
    payload = te_layout.delayed_scaling_payload(scale=3.0)
    value, pickled = extra_state.vet(payload, "ckpt: norm._extra_state")
    assert pickled and value.dtype == torch.uint8
    state = extra_state.decode(value.numpy().tobytes())
    assert state["recipe"] == te_layout.DelayedScaling()
    assert state["recipe"].fp8_format is te_layout.Format.HYBRID
    assert torch.equal(state["scale_fwd"], torch.full((3,), 3.0))
    assert torch.equal(state["amax_history_fwd"], torch.arange(6.0).reshape(2, 3))
    assert state["extra_fp8_variables"] == {"num_gemms": 1, "fp8_checkpoint": True}


def test_te_refuses_without_the_flag_and_loads_vetted_state_with_it(te_recipe, monkeypatch):
    """TE (stand-in with TE 2.20's set_extra_state) refuses the pickle; vet + te_may_unpickle
    loads it and restores the environment."""
    monkeypatch.delenv(extra_state.UNSAFE_PICKLE_ENV, raising=False)
    module = torch.nn.RMSNorm(4)
    module.__class__ = type("TELikeRMSNorm", (torch.nn.RMSNorm,), {
        "get_extra_state": lambda self: torch.empty(0, dtype=torch.uint8),
        "set_extra_state": te_layout._te_like_set_extra_state})
    state = {"weight": torch.ones(4), "_extra_state": te_layout.delayed_scaling_payload()}
    with pytest.raises(RuntimeError, match="Refusing"):
        module.load_state_dict(dict(state))
    needed = extra_state.vet_state_dict(state, "ckpt")
    with extra_state.te_may_unpickle(needed):
        assert os.environ[extra_state.UNSAFE_PICKLE_ENV] == "1"
        module.load_state_dict(state)
    assert extra_state.UNSAFE_PICKLE_ENV not in os.environ
    assert torch.equal(module.te_like_loaded["scale_fwd"], torch.full((3,), 2.0))


def test_code_in_extra_state_is_refused_before_it_runs(tmp_path, te_recipe):
    marker = tmp_path / "ran"
    evil = torch.frombuffer(bytearray(pickle.dumps({"recipe": _Payload(marker)})),
                            dtype=torch.uint8)
    with pytest.raises(extra_state.UnsafeExtraStateError, match=r"ckpt: x._extra_state.*system"):
        extra_state.vet_state_dict({"x._extra_state": evil}, "ckpt")
    assert not marker.exists()
    # a TE recipe with a callable (not one of TE's string algorithms) is refused too
    recipe = te_layout.DelayedScaling(amax_compute_algo=print)
    bad = torch.frombuffer(bytearray(pickle.dumps({"recipe": recipe})), dtype=torch.uint8)
    with pytest.raises(extra_state.UnsafeExtraStateError, match="builtins.print"):
        extra_state.vet(bad, "ckpt")
    # any dtype: TE unpickles the raw bytes of whatever tensor it is given
    raw = pickle.dumps(_Payload(marker))
    as_float = torch.frombuffer(bytearray(raw + b"\0" * (-len(raw) % 4)), dtype=torch.float32)
    with pytest.raises(extra_state.UnsafeExtraStateError, match="system"):
        extra_state.vet(as_float, "ckpt")
    with pytest.raises(extra_state.UnsafeExtraStateError, match="io.BytesIO"):
        extra_state.vet(io.BytesIO(b"x"), "ckpt")
    assert not marker.exists()


def test_empty_and_missing_states_need_no_unpickling():
    for value in (None, torch.empty(0, dtype=torch.uint8)):
        assert extra_state.vet(value, "ckpt") == (value, False)
    assert not extra_state.vet_state_dict({"w": torch.ones(2), "a._extra_state": None}, "ckpt")
