import json

import pytest

from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import SamplingParams
from avr_megatron.method.tree import Provenance, RefinementNode, RefinementTree

X = [{"role": "user", "content": "Q"}]


def child(i, j, reward, **kw):
    return RefinementNode(
        f"r1/b0/c{i}/y{j}", f"answer {i}{j}", round=1, reward=reward, criticism=f"crit {i} [[5]]", rating=5,
        criticism_index=i, criticism_tries=1, criticism_key=f"p/s1/r1/b0/crit/t1#{i}",
        sample_key=f"p/s1/r1/b0/c{i}/improve#{j}", **kw,
    )


def make_tree():
    root = RefinementNode("y0", "first", reward=0.5, counters={"criticism_resamples": 2})
    root.children = [child(0, 0, 1.0), child(0, 1, 0.0), child(1, 0, 2.0)]
    root.children[2].children = [
        RefinementNode("r2/b0/c0/y0", "deeper", round=2, reward=3.0, criticism="c [[9]]", rating=9, criticism_index=0)
    ]
    prov = Provenance("policy", "rm", SamplingParams(seed=3))
    return RefinementTree("p", X, root, prov, PromptTemplates(review_label="Critique:"), k=2, m=2)


def test_json_round_trip():
    tree = make_tree()
    d = json.loads(json.dumps(tree.to_dict()))
    back = RefinementTree.from_dict(d)
    assert back == tree
    assert back.templates.review_label == "Critique:" and back.provenance.sampling.seed == 3


def test_navigation():
    tree = make_tree()
    assert [n.id for n in tree.nodes()] == ["y0", "r1/b0/c0/y0", "r1/b0/c0/y1", "r1/b0/c1/y0", "r2/b0/c0/y0"]
    groups = tree.root.criticism_groups()
    assert [(i, [c.id for c in cs]) for i, cs in groups] == [(0, ["r1/b0/c0/y0", "r1/b0/c0/y1"]), (1, ["r1/b0/c1/y0"])]
    assert [n.id for n in tree.lineage("r2/b0/c0/y0")] == ["y0", "r1/b0/c1/y0", "r2/b0/c0/y0"]
    assert tree.find("y0") is tree.root
    with pytest.raises(ValueError, match="tree 'p': no node 'nope'"):
        tree.lineage("nope")


def bad(path, value):
    d = make_tree().to_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    "path, value, match",
    [
        (["root", "children", 0, "reward"], "high", r"^tree\.root\.children\[0\]\.reward: expected a number"),
        (["root", "children", 1, "rating"], 11, r"^tree\.root\.children\[1\]\.rating: a rating is 1\.\.10"),
        (["root", "answer"], "", r"^tree\.root\.answer: is empty"),
        (["root", "counters"], {"x": -1}, r"^tree\.root\.counters\.x: expected an integer >= 0"),
        (["root", "colour"], "red", r"^tree\.root\.colour: unknown field"),
        (["root", "round"], KeyError, r"^tree\.root\.round: missing"),
        (["provenance", "sampling", "top_p"], 2, r"^tree\.provenance\.sampling\.top_p"),
        (["provenance", "model"], "", r"^tree\.provenance\.model"),
        (["x"], [], r"^tree\.x: conversation is empty"),
        (["k"], 0, r"^tree\.k: expected an integer >= 1"),
        (["templates", "improve"], 1, r"^tree\.templates\.improve: expected a string"),
        (["root", "children", 1, "id"], "r1/b0/c0/y0", r"^tree: node id 'r1/b0/c0/y0' occurs more than once"),
    ],
)
def test_from_dict_names_the_bad_field(path, value, match):
    with pytest.raises(ValueError, match=match):
        RefinementTree.from_dict(bad(path, value))


def test_criticism_groups_need_indices():
    root = RefinementNode("y0", "a", children=[RefinementNode("c", "b")])
    with pytest.raises(ValueError, match="node 'c': child without a criticism_index"):
        root.criticism_groups()
