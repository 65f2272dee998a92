"""Chunked vocab-parallel log-probs equal a plain full-vocabulary log_softmax (values and
gradients), ignore padded vocabulary columns, and sum per sequence."""

import pytest
import torch

from avr_megatron.training.logprobs import sequence_sums, token_logprobs


def _reference(logits, labels, mask, vocab):
    logp = torch.log_softmax(logits[..., :vocab].double(), dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0)


@pytest.mark.parametrize("chunk", [0, 1, 5, 4096])
@pytest.mark.parametrize("padded", [0, 11])
@pytest.mark.parametrize("masked", ["random", "all"])
def test_matches_log_softmax_values_and_grads(chunk, padded, masked):
    g = torch.Generator().manual_seed(0)
    vocab, b, s = 37, 3, 9
    logits = (3 * torch.randn(b, s, vocab + padded, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    if masked == "all":  # contiguous rows: read without a gather
        mask = torch.ones(b, s, dtype=torch.bool)
    weights = torch.randn(b, s, generator=g)
    before = logits.detach().clone()

    ours = token_logprobs(logits, labels, mask, vocab, chunk_size=chunk)
    (ours * weights).sum().backward()
    assert torch.equal(logits.detach(), before)  # in-place work never touches the logits
    grad = logits.grad.clone()
    logits.grad = None
    ref = _reference(logits, labels, mask, vocab)
    (ref * weights).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, logits.grad.float(), atol=1e-6, rtol=1e-5)
    assert (grad[..., vocab:] == 0).all()  # padded columns get no gradient
    assert (grad[~mask] == 0).all()  # untrained rows get no gradient


def test_bf16_logits_give_bf16_grad_and_fp32_logps():
    g = torch.Generator().manual_seed(1)
    logits32 = torch.randn(2, 6, 50, generator=g)
    labels = torch.randint(0, 48, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    logits = logits32.bfloat16().requires_grad_()
    out = token_logprobs(logits, labels, mask, 48, chunk_size=4)
    out.sum().backward()
    assert out.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = _reference(logits.detach().float(), labels, mask, 48)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_sequence_sums_and_empty_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    segment = torch.tensor([[0, 0, 1, -1], [2, 2, 2, 2]])
    assert sequence_sums(per_token, segment, 3).tolist() == [3.0, 3.0, 26.0]
    logits = torch.randn(1, 3, 8, requires_grad=True)
    out = token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long),
                         torch.zeros(1, 3, dtype=torch.bool), 8)
    assert out.tolist() == [[0.0, 0.0, 0.0]]
