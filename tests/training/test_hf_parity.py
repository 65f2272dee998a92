"""The preference losses and their gradients on a packed Megatron batch equal a plain-PyTorch
computation on Hugging Face models with the same weights (each sequence run alone, tokenised
independently); packed per-sequence log-probs equal unpacked ones; stored (`avr logps`) and
online reference log-probs equal the HF reference's. All of it also with each pair's shared
prompt computed once (`collate(share_prompt=True)`).

HF weights reach the Megatron model through avr_megatron.testing.hf_llama_weights (a test-side
mapping; production conversion is the conversion package).
"""

import pytest
import torch

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

VARIANTS = {
    "dpo": ["loss.beta=0.1"],
    "cdpo+sft": ["loss.beta=0.2", "loss.label_smoothing=0.15", "loss.sft_weight=0.5"],
    "ipo-normalised": ["loss.type=ipo", "loss.beta=0.5", "loss.length_normalize=true"],
    "margin": ["loss.reward_gap=margin", "loss.reward_gap_scale=0.3"],
    "weight": ["loss.reward_gap=weight", "loss.reward_gap_weight_max=1.5"],
    "soft_label": ["loss.reward_gap=soft_label", "loss.reward_gap_scale=2.0"],
}


def _plain_loss(name, pc, pr, rc, rr, nc, nr, gap, gap_mean):
    """The loss of each variant, written out as in the papers / TRL."""
    F = torch.nn.functional
    h = (pc - pr) - (rc - rr)
    if name == "dpo":
        return -F.logsigmoid(0.1 * h)
    if name == "cdpo+sft":
        return (-0.85 * F.logsigmoid(0.2 * h) - 0.15 * F.logsigmoid(-0.2 * h)) + 0.5 * (-pc / nc)
    if name == "ipo-normalised":
        hn = (pc / nc - pr / nr) - (rc / nc - rr / nr)
        return (hn - 1 / (2 * 0.5)) ** 2
    if name == "margin":
        return -F.logsigmoid(0.1 * h - 0.3 * gap)
    if name == "weight":
        return torch.clamp(gap / gap_mean, max=1.5) * -F.logsigmoid(0.1 * h)
    if name == "soft_label":
        p = torch.sigmoid(2.0 * gap)
        return -p * F.logsigmoid(0.1 * h) - (1 - p) * F.logsigmoid(-0.1 * h)
    raise KeyError(name)


def _hf_sequence_logps(model, tok, prompt, completion):
    """Independent tokenisation: prompt with generation prompt, then the whole conversation;
    the completion is everything after the prompt's tokens."""
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    f_text = tok.apply_chat_template(prompt + completion, tokenize=False)
    p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
    ids = tok(f_text, add_special_tokens=False)["input_ids"]
    assert ids[:len(p_ids)] == p_ids
    ids_t = torch.tensor([ids])
    logp = torch.log_softmax(model(ids_t).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(1, ids_t[0, 1:, None])[:, 0]
    n = len(p_ids)
    return picked[n - 1:].sum(), len(ids) - n, ids, n


def _case(tmp, share=False):
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaForCausalLM

    from avr_megatron.config import load_config
    from avr_megatron.data.batches import collate
    from avr_megatron.data.chat import ChatTokenizer
    from avr_megatron.data.packing import pack_best_fit_decreasing
    from avr_megatron.data.records import read_preferences
    from avr_megatron.data.tokenized import tokenize_preferences
    from avr_megatron.models.llama import build_model, padded_vocab_size
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.testing.hf_llama_weights import hf_to_canonical
    from avr_megatron.testing.tiny_hf import make_tiny_llama, train_tiny_tokenizer
    from avr_megatron.testing.toy_data import preference_records, write_jsonl
    from avr_megatron.training.losses.common import SequenceLogprobs, packed_forward
    from avr_megatron.training.losses.preference import PreferenceObjective
    from avr_megatron.training.reference import OnlineReference, PrecomputedReference

    tmp = Path(tmp)
    tok_dir = train_tiny_tokenizer(tmp / "tok")
    policy_dir = make_tiny_llama(tmp / "policy", tok_dir, seed=1)
    ref_dir = make_tiny_llama(tmp / "ref", tok_dir, seed=2)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    hf_policy = LlamaForCausalLM.from_pretrained(policy_dir).float()
    hf_ref = LlamaForCausalLM.from_pretrained(ref_dir).float().eval()
    vocab = len(tok)

    records = preference_records(7, seed=3)
    records[0]["prompt"] = [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Answer: plan"},
                            {"role": "assistant", "content": "yes."},
                            {"role": "user", "content": "Answer: code data"}]
    write_jsonl(records, tmp / "pairs.jsonl")
    recs = read_preferences(tmp / "pairs.jsonl")
    data = tokenize_preferences(recs, ChatTokenizer(tok), 256, "drop")
    plan = pack_best_fit_decreasing(data.unit_lengths, 256)
    batch = collate(data, plan, range(plan.num_bins), ChatTokenizer(tok).pad_id,
                    share_prompt=share)
    assert (batch.shared is not None) == share

    # ---- independent HF side: per-pair log-probs (policy with grad, reference without)
    hf = []
    for u, r in enumerate(records):
        pc, nc, ids_c, n_pc = _hf_sequence_logps(hf_policy, tok, r["prompt"], r["chosen"])
        pr, nr, ids_r, n_pr = _hf_sequence_logps(hf_policy, tok, r["prompt"], r["rejected"])
        with torch.no_grad():
            rc = _hf_sequence_logps(hf_ref, tok, r["prompt"], r["chosen"])[0]
            rr = _hf_sequence_logps(hf_ref, tok, r["prompt"], r["rejected"])[0]
        # our chat masking must agree with the independent tokenisation
        for s, ids, n_prompt in ((2 * u, ids_c, n_pc), (2 * u + 1, ids_r, n_pr)):
            our_ids, our_mask = data.sequence(s)
            assert our_ids.tolist() == ids, (u, s)
            assert our_mask.tolist() == [False] * n_prompt + [True] * (len(ids) - n_prompt)
        hf.append((pc, pr, rc, rr, nc, nr, r["reward_gap"]))
    gaps = torch.tensor([h[6] for h in hf], dtype=torch.float64)
    gap_mean = float(gaps.mean())
    ref_c = torch.tensor([float(h[2]) for h in hf], dtype=torch.float64)
    ref_r = torch.tensor([float(h[3]) for h in hf], dtype=torch.float64)

    # ---- Megatron side
    cfg = load_config(None, ["model.preset=tiny", f"model.vocab_size={vocab}",
                             "model.make_vocab_size_divisible_by=256", "train.seq_length=256"])
    initialize(cfg)
    chunks = build_model(cfg)
    padded = padded_vocab_size(cfg.model)
    assert padded > vocab  # padded columns exist and must be ignored
    canon = lambda sd: hf_to_canonical(sd, num_layers=2, num_heads=4, num_groups=2,  # noqa: E731
                                       padded_vocab=padded)
    load_full_state_dict(chunks, canon({k: v.detach() for k, v in hf_policy.state_dict().items()}),
                         tied=False)
    model = chunks[0]
    result = {"variants": {}}
    for name, overrides in VARIANTS.items():
        lcfg = load_config(None, overrides).loss
        objective = PreferenceObjective(lcfg, vocab_size=vocab, use_te=False, bf16=False,
                                        reference=PrecomputedReference(ref_c.numpy(), ref_r.numpy()),
                                        gap_mean=gap_mean)
        objective.prepare([batch])
        model.zero_grad(set_to_none=True)
        logits = packed_forward(model, batch, use_te=False, bf16=False)
        loss_sum, count, metrics = objective.loss(batch, logits)
        loss_sum.backward()
        ours = gather_full(chunks, False, value=lambda p: p.grad)

        hf_policy.zero_grad(set_to_none=True)
        hf_policy.train()
        total = 0.0
        units = batch.pair_units.tolist()
        for u in units:  # same pairs, in the batch's order
            pc, pr, rc, rr, nc, nr, gap = hf[u]
            total = total + _plain_loss(name, pc, pr, rc, rr, nc, nr, torch.tensor(gap), gap_mean)
        total.backward(retain_graph=True)
        theirs = canon({k: p.grad for k, p in hf_policy.named_parameters()})
        grad_err = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item()
                       for k in theirs)
        result["variants"][name] = {
            "loss": loss_sum.item(), "hf_loss": float(total), "count": int(count),
            "grad_rel_err": grad_err,
            "padded_rows_grad": ours["output_layer.weight"][vocab:].abs().max().item(),
            "accuracy": metrics["rewards/accuracies"][0].item() / metrics["rewards/accuracies"][1].item()}

    # ---- packed vs unpacked (each sequence alone with Megatron's own causal mask)
    seq_lp = SequenceLogprobs(vocab, 7)
    with torch.no_grad():
        packed = seq_lp.sequences(packed_forward(model, batch, use_te=False, bf16=False), batch)
        alone = []
        for k in range(batch.num_sequences):
            s = int(batch.seq_unit[k]) * 2 + int(batch.seq_role[k])
            ids, mask = data.sequence(s)
            t = torch.as_tensor(ids, dtype=torch.long)[None]
            pos = torch.arange(t.shape[1])[None]
            logits = model(t, pos, None)
            labels = torch.cat([t[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
            m = torch.as_tensor(mask[1:].tolist() + [False])[None]
            alone.append(seq_lp.tokens(logits, type(batch)(
                tokens=t, labels=labels, loss_mask=m, position_ids=pos,
                segment=torch.zeros_like(t), seq_unit=torch.zeros(1, dtype=torch.long),
                seq_role=torch.zeros(1, dtype=torch.long),
                seq_targets=torch.zeros(1, dtype=torch.long))).sum())
        alone = torch.stack(alone)
    hf_all = torch.stack([torch.stack([hf[u][0], hf[u][1]]) for u in range(len(records))]).detach()
    hf_packed_order = hf_all[batch.seq_unit, batch.seq_role]
    result["packed_vs_unpacked"] = (packed - alone).abs().max().item()
    result["packed_vs_hf"] = (packed - hf_packed_order).abs().max().item()
    result["sequences"], result["bins"] = batch.num_sequences, plan.num_bins
    result["computed_tokens"] = batch.real_tokens()
    result["pair_tokens"] = int(data.unit_lengths.sum())

    # ---- online reference and the stored one (compute_store) equal the HF reference
    load_full_state_dict(chunks, canon(hf_ref.state_dict()), tied=False)
    model.eval()
    online = OnlineReference(chunks, SequenceLogprobs(vocab, 64).sequences, use_te=False,
                             bf16=False, seq_length=256, bins_per_microbatch=plan.num_bins)
    b2 = collate(data, plan, range(plan.num_bins), ChatTokenizer(tok).pad_id, share_prompt=share)
    online.attach([b2])
    result["online_vs_hf_ref"] = max((b2.ref_chosen - ref_c[b2.pair_units]).abs().max().item(),
                                     (b2.ref_rejected - ref_r[b2.pair_units]).abs().max().item())
    return result


@pytest.mark.parametrize("share", [False, True], ids=["separate", "shared_prompt"])
def test_preference_losses_and_grads_match_hf(tmp_path, share):
    r = run_distributed(_case, nproc=1, tmp=str(tmp_path), share=share)[0]
    assert r["bins"] < r["sequences"] / 2, "several pairs must share a bin"
    # sharing computes each pair's prompt once
    assert (r["computed_tokens"] < r["pair_tokens"]) == share, r
    for name, v in r["variants"].items():
        assert v["count"] == 7, (name, v)
        assert abs(v["loss"] - v["hf_loss"]) < 1e-5 * max(1.0, abs(v["hf_loss"])), (name, v)
        assert v["grad_rel_err"] < 1e-4, (name, v)
        assert v["padded_rows_grad"] == 0.0, (name, v)
    assert r["packed_vs_unpacked"] < 1e-4, r
    assert r["packed_vs_hf"] < 1e-4, r
    assert r["online_vs_hf_ref"] < 1e-4, r
