"""Toy chat datasets with learnable rules, in the formats training reads (JSONL / Parquet):
SFT conversations whose answers repeat the question's words in order, and preference pairs whose
chosen answer is built from "positive" words and the rejected one from "negative" words (with a
reward gap that grows with the chosen answer's length). Used by tests, benchmarks and the tiny
recipes; nothing here touches a hub.

    python -m avr_megatron.testing.toy_data OUT_DIR [--pairs N] [--sft N]
        -> OUT_DIR/sft.jsonl, OUT_DIR/pairs.jsonl, OUT_DIR/tokenizer/ (a tiny BPE tokenizer with
           a Llama-3 style chat template)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POSITIVE = "good better best clear yes true thanks help".split()
NEGATIVE = "bad worse not no false maybe wrong never".split()
TOPICS = ("story poem email summary plan idea code data list example reason result answer "
          "question model step").split()


def _question(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(TOPICS) for _ in range(n)]


def sft_records(n: int, seed: int = 0, multi_turn_every: int = 4) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = _question(rng, rng.randint(2, 6))
        messages = [{"role": "user", "content": "Repeat: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(words) + "."}]
        if multi_turn_every and i % multi_turn_every == 0:
            more = _question(rng, rng.randint(2, 4))
            messages += [{"role": "user", "content": "Repeat: " + " ".join(more)},
                         {"role": "assistant", "content": " ".join(more) + "."}]
        out.append({"id": f"sft-{i}", "kind": "rsft", "messages": messages})
    return out


def preference_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": "Answer: " + " ".join(_question(rng, rng.randint(2, 5)))}]
        k_c, k_r = rng.randint(2, 8), rng.randint(2, 8)
        chosen = " ".join(rng.choice(POSITIVE) for _ in range(k_c)) + "."
        rejected = " ".join(rng.choice(NEGATIVE) for _ in range(k_r)) + "."
        r_c, r_r = 1.0 + 0.25 * k_c, -0.5 + 0.1 * rng.random()
        out.append({"id": f"pair-{i}", "pair_type": "response", "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "reward_chosen": r_c, "reward_rejected": r_r, "reward_gap": r_c - r_r})
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet_shards(records: list[dict], out_dir: str | Path, shards: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        pq.write_table(pa.Table.from_pylist(records[k::shards]), out / f"part-{k:05d}.parquet")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--sft", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer

    out = Path(args.out_dir)
    write_jsonl(sft_records(args.sft, args.seed), out / "sft.jsonl")
    write_jsonl(preference_records(args.pairs, args.seed), out / "pairs.jsonl")
    train_tiny_tokenizer(out / "tokenizer")
    print(f"wrote {out / 'sft.jsonl'}, {out / 'pairs.jsonl'} and {out / 'tokenizer'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
