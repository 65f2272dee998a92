import pytest
from method_fakes import PROVENANCE, X, FakeEngine

from avr_megatron.method.frontier import run_frontier
from avr_megatron.method.stage1 import Stage1TreeBuilder


def test_frontier_batches_across_prompts():
    engine = FakeEngine(seed=3)
    builders = [Stage1TreeBuilder(f"p{i}", X, None if i % 2 else "given", k=2, m=2, provenance=PROVENANCE) for i in range(8)]
    calls = run_frontier(builders, engine.generate, engine.score)
    assert all(b.done for b in builders)
    # Call 1: y0 of the odd prompts + criticisms of the even ones; 2: improvements of the even ones
    # + criticisms of the odd ones; 3: improvements of the odd ones; 4: one scoring call for all.
    assert calls == 4 and len(engine.score_calls) == 1
    assert len(engine.score_calls[0]) == 8 * (1 + 4)
    assert [len(c) for c in engine.generate_calls] == [4 + 4, 4 * 2 + 4, 4 * 2]


def test_frontier_gives_the_same_trees_as_one_prompt_at_a_time():
    def build(i):
        return Stage1TreeBuilder(f"p{i}", X, "given", k=2, m=2, provenance=PROVENANCE)

    batched = [build(i) for i in range(5)]
    run_frontier(batched, FakeEngine(1, 0.3, 0.2).generate, FakeEngine(1, 0.3, 0.2).score)
    for i, b in enumerate(batched):
        alone = build(i)
        engine = FakeEngine(1, 0.3, 0.2)
        run_frontier([alone], engine.generate, engine.score)
        assert alone.tree == b.tree


def test_duplicate_prompt_ids_are_refused():
    engine = FakeEngine()
    twins = [Stage1TreeBuilder("same", X, "y", provenance=PROVENANCE) for _ in range(2)]
    with pytest.raises(ValueError, match="duplicate request key 'same/s1/"):
        run_frontier(twins, engine.generate, engine.score)


def test_engine_answer_count_is_checked():
    engine = FakeEngine()
    with pytest.raises(ValueError, match="engine returned 0 results for 1 requests"):
        run_frontier([Stage1TreeBuilder("p", X, "y", r0=0.0, provenance=PROVENANCE)], lambda reqs: [], engine.score)
