"""The mapping table against layouts written out by hand here, in both directions."""

import torch

from avr_megatron.config.schema import ModelConfig
from avr_megatron.conversion.dist_io import storage_key, tp_chunks
from avr_megatron.conversion.mapping import expected_hf, model_tensors
from avr_megatron.models.llama import padded_vocab_size
from avr_megatron.testing.hf_llama_weights import hf_to_canonical


def _model(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8,
                num_query_groups=2, kv_channels=8, vocab_size=100,
                make_vocab_size_divisible_by=64, tie_word_embeddings=False)
    return ModelConfig(**{**base, **kw})


def _hf_random(m):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in expected_hf(m).items()}


def _reference_megatron(hf, m):
    """Megatron's layouts spelled out by the test-side mapping: QKV grouped per query group,
    fc1 = [gate; up], vocab padded with zero rows."""
    return hf_to_canonical(hf, num_layers=m.num_layers, num_heads=m.num_attention_heads,
                           num_groups=m.num_query_groups, padded_vocab=padded_vocab_size(m),
                           tied=m.tie_word_embeddings)


def _merge_all(hf, m, block=None):
    out = {}
    for t in model_tensors(m):
        read = lambda name, a, b: hf[name][a:b]  # noqa: E731
        step = block or t.shape[0]
        out[t.name] = torch.cat([t.merge_rows(read, a, min(a + step, t.shape[0]), torch.float32)
                                 for a in range(0, t.shape[0], step)])
    return out


def test_merge_matches_hand_written_layout_and_split_inverts_it():
    for tied in (False, True):
        m = _model(tie_word_embeddings=tied)
        hf = _hf_random(m)
        ref = _reference_megatron(hf, m)
        for block in (None, 5):  # whole tensors and odd row blocks crossing segment borders
            merged = _merge_all(hf, m, block)
            assert merged.keys() == ref.keys()
            for k in ref:
                assert torch.equal(merged[k], ref[k]), k
        back = {}
        for t in model_tensors(m):
            for a in range(0, t.shape[0], 7):
                for name, first, piece in t.split_rows(merged[t.name][a:a + 7], start=a):
                    back.setdefault(name, []).append((first, piece))
        rebuilt = {n: torch.cat([p for _, p in sorted(ps, key=lambda x: x[0])])
                   for n, ps in back.items()}
        assert rebuilt.keys() == hf.keys()
        for n in hf:
            assert torch.equal(rebuilt[n], hf[n]), n


def test_tp_chunks_are_what_each_rank_holds():
    """The chunks written for TP=2 equal testing.state.shard_for_rank's pieces (the layout
    load_full_state_dict puts into a TP=2 model), and join_shards puts them back together."""
    from types import SimpleNamespace

    from avr_megatron.testing.state import join_shards, shard_for_rank

    m = _model()
    merged = _merge_all(_hf_random(m), m)
    for t in model_tensors(m):
        full = merged[t.name]
        param = SimpleNamespace(tensor_model_parallel=t.param.tp_dim is not None,
                                partition_dim=t.param.tp_dim)
        chunks = tp_chunks(t, 2)
        if t.param.tp_dim is None:  # replicated: one chunk that every rank holds
            assert chunks == [((0,) * full.dim(), tuple(full.shape))]
            continue
        per_rank = 2 if t.param.glu else 1
        for r in range(2):
            pieces = []
            for off, size in chunks[r * per_rank:(r + 1) * per_rank]:
                piece = full
                for dim, (o, s) in enumerate(zip(off, size)):
                    piece = piece.narrow(dim, o, s)
                pieces.append(piece)
            expected = shard_for_rank(t.name, param, full, 2, r)
            assert torch.equal(torch.cat(pieces, dim=t.param.tp_dim), expected), t.name
        shards = [shard_for_rank(t.name, param, full, 2, r) for r in range(2)]
        assert torch.equal(join_shards(t.name, param, shards), full), t.name


def test_storage_keys_drop_the_layer_number():
    m = _model()
    keys = {storage_key(t) for t in model_tensors(m)}
    assert "decoder.layers.self_attention.linear_qkv.weight" in keys
    assert "embedding.word_embeddings.weight" in keys
    assert not any(".0." in k or ".1." in k for k in keys)
