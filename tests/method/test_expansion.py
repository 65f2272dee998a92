from avr_megatron.method.expansion import Expansion
from avr_megatron.method.machine import RequestMachine
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import SamplingParams
from avr_megatron.method.tree import RefinementNode

X = [{"role": "user", "content": "Q"}]


class Host(RequestMachine):
    def __init__(self, parents, k=2, m=1):
        super().__init__("host")
        self.finished = 0
        self.expansion = Expansion(
            self._issue, prompt_id="p", stage="s2", x=X, parents=parents, round_no=3, k=k, m=m,
            templates=PromptTemplates(), sampling=SamplingParams(), max_rating_tries=2, on_done=self._done,
        )
        self.expansion.start()

    def _done(self):
        self.finished += 1

    @property
    def done(self):
        return self.expansion.finished


def test_expands_several_parents_and_attaches_children_in_index_order():
    parents = [RefinementNode("a", "answer a", reward=0.0), RefinementNode("b", "answer b", reward=0.0)]
    host = Host(parents)
    assert sorted(r.key for r in host.pending()) == ["p/s2/r3/b0/crit/t1", "p/s2/r3/b1/crit/t1"]
    host.feed({"p/s2/r3/b0/crit/t1": ["x [[1]]", "y [[2]]"], "p/s2/r3/b1/crit/t1": ["none", "z [[3]]"]})
    # Improvements answered in reverse order; parent b's slot 0 is retried.
    host.feed({"p/s2/r3/b0/c1/improve": ["a1"], "p/s2/r3/b1/c1/improve": ["b1"]})
    host.feed({"p/s2/r3/b0/c0/improve": ["a0"], "p/s2/r3/b1/crit/t2": ["w [[4]]"]})
    host.feed({"p/s2/r3/b1/c0/improve": ["b0"]})
    scores = sorted(r.key for r in host.pending())
    assert scores == ["p/s2/r3/b0/c0/y0/score", "p/s2/r3/b0/c1/y0/score", "p/s2/r3/b1/c0/y0/score", "p/s2/r3/b1/c1/y0/score"]
    assert not host.done and parents[0].children == []  # attached only when the round completes
    host.feed({k: 1.0 for k in scores})
    assert host.done and host.finished == 1
    assert [c.id for c in parents[0].children] == ["r3/b0/c0/y0", "r3/b0/c1/y0"]
    assert [(c.id, c.criticism, c.criticism_tries) for c in parents[1].children] == [
        ("r3/b1/c0/y0", "w [[4]]", 2), ("r3/b1/c1/y0", "z [[3]]", 1)]
    assert [c.id for c in host.expansion.new_nodes] == ["r3/b0/c0/y0", "r3/b0/c1/y0", "r3/b1/c0/y0", "r3/b1/c1/y0"]
    assert all(c.round == 3 for c in host.expansion.new_nodes)
    assert parents[1].counters == {"criticism_resamples": 1}


def test_round_with_nothing_surviving_still_finishes():
    parent = RefinementNode("a", "answer", reward=0.0)
    host = Host([parent], k=1)
    host.feed({"p/s2/r3/b0/crit/t1": ["none"]})
    host.feed({"p/s2/r3/b0/crit/t2": ["none"]})
    assert host.done and host.finished == 1 and parent.children == []
    assert parent.counters == {"criticism_resamples": 1, "criticisms_dropped": 1}
