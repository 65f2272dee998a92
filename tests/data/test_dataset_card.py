"""Dataset cards: datasets.load_dataset reads the directory through the card's configs (the data
file only, not summary.json beside it), and the card says what the data is."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from avr_megatron.data.dataset_card import write_dataset_card


def test_card_loads_with_datasets_and_names_its_data(tmp_path):
    from datasets import load_dataset

    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}], "reward_gap": 1.0 + i}
            for i in range(5)]
    d = tmp_path / "preference"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), d / "train.parquet")
    (d / "summary.json").write_text(json.dumps({"not": "data"}))
    card = write_dataset_card(d, [d / "train.parquet"], title="Pairs", description="Toy pairs.",
                              rows=5, columns=list(rows[0]), tags=["preference"],
                              provenance={"policy model": "tiny", "records by type": {"a": 5},
                                          "unset": None})
    text = card.read_text()
    assert text.startswith("---\npretty_name:") and "# Pairs" in text and "- records: 5" in text
    assert "| policy model | tiny |" in text and "unset" not in text
    ds = load_dataset(str(d), split="train")
    assert ds.num_rows == 5 and ds["id"] == [r["id"] for r in rows]
    # New content under the same card layout: read afresh, not from datasets' cache.
    pq.write_table(pa.Table.from_pylist(rows[:3]), d / "train.parquet")
    write_dataset_card(d, [d / "train.parquet"], title="Pairs", description="Toy pairs.",
                       rows=3, columns=list(rows[0]), provenance={})
    assert load_dataset(str(d), split="train").num_rows == 3


def test_cards_do_not_change_content_fingerprints(tmp_path):
    from avr_megatron.data.fingerprint import fingerprint_dir

    pq.write_table(pa.Table.from_pylist([{"id": "a"}]), tmp_path / "train.parquet")
    before = fingerprint_dir(tmp_path)
    write_dataset_card(tmp_path, [tmp_path / "train.parquet"], title="t", description="d",
                       rows=1, columns=["id"], provenance={"made at": str(tmp_path)})
    assert fingerprint_dir(tmp_path) == before
    pq.write_table(pa.Table.from_pylist([{"id": "b"}]), tmp_path / "train.parquet")
    assert fingerprint_dir(tmp_path) != before
