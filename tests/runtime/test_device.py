"""The package's one device helper, and that `avr smoke` puts its batches where the model runs."""

import torch

from avr_megatron.runtime import device as device_mod


def test_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        assert device_mod.device() == torch.device("cuda", torch.cuda.current_device())
    else:
        assert device_mod.device() == torch.device("cpu") and not device_mod.on_gpu()


def test_smoke_forward_step_moves_its_batch_to_the_device(monkeypatch):
    """The counting batches are built on the host; the forward step must hand the model (and
    the loss) tensors on this process's device. A 'meta' device stands in for the GPU."""
    from avr_megatron.training import smoke

    meta = torch.device("meta")
    monkeypatch.setattr(device_mod, "device", lambda: meta)
    seen = {}

    def model(tokens, positions, mask):
        seen.update(tokens=tokens.device, positions=positions.device)
        return torch.empty(2, 8, 16, device=meta)

    batches = smoke.counting_batches(16, 2, 8, seed=0)
    _, loss_func = smoke._forward_step(batches, model)
    assert seen == {"tokens": meta, "positions": meta}
    assert loss_func.args[0].device == meta  # the labels
