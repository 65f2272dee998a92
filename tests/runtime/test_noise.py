"""Known library noise is silenced in one place; everything else still shows."""

import logging
import warnings

from avr_megatron.runtime import noise


def test_known_noise_is_silenced_and_the_rest_is_not(monkeypatch, caplog):
    monkeypatch.delenv("AVR_LOG_LEVEL", raising=False)
    monkeypatch.setattr(noise, "_installed", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        noise.quiet_known_noise()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use",
                      FutureWarning)
        warnings.warn("something new", UserWarning)
    assert [str(w.message) for w in seen] == ["something new"]
    gpt = logging.getLogger("megatron.core.models.gpt.gpt_model")
    with caplog.at_level(logging.WARNING):
        gpt.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        gpt.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]
    for f in list(gpt.filters):
        gpt.removeFilter(f)
