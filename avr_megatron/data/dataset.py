"""From the recipe to packed training data: read records, tokenise with the chat template,
apply the over-length rule, pack. Every rank runs this and gets the same result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.data.chat import ChatTokenizer, load_tokenizer, tokenizer_fingerprint
from avr_megatron.data.fingerprint import fingerprint_files
from avr_megatron.data.packing import PackingPlan, one_per_bin, pack_best_fit_decreasing
from avr_megatron.data.records import read_preferences, read_sft, resolve_files
from avr_megatron.data.tokenized import (
    TokenizedDataset,
    require_reward_gaps,
    tokenize_preferences,
    tokenize_sft,
)


@dataclass
class TrainingData:
    kind: str  # sft | preference
    files: list[Path]
    data: TokenizedDataset
    plan: PackingPlan
    chat: ChatTokenizer
    tokenizer_fingerprint: str
    files_fingerprint: str

    def summary(self) -> dict:
        return {"files": [str(f) for f in self.files], "files_fingerprint": self.files_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "examples_fingerprint": self.data.fingerprint(),
                **self.data.summary.as_dict(), "packing": self.plan.stats()}


def tokenizer_path(cfg: AvrConfig) -> str:
    path = cfg.data.tokenizer or cfg.model.init_from.hf
    if path is None:
        raise ConfigError("data.tokenizer is not set (nor model.init_from.hf to take it from): "
                          "name the Hugging Face tokenizer directory whose chat template to use")
    return path


def load_training_data(cfg: AvrConfig, kind: str, *, pack: bool | None = None) -> TrainingData:
    """kind: "sft" or "preference". pack=None follows data.pack."""
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: name the training data (a Parquet/JSONL "
                          "file, a directory of shards or a glob)")
    files = resolve_files(cfg.data.train)
    tok = load_tokenizer(tokenizer_path(cfg))
    chat = ChatTokenizer(tok)
    L = cfg.train.seq_length
    if kind == "sft":
        data = tokenize_sft(read_sft(cfg.data.train), chat, L, cfg.data.overlong,
                            cfg.data.sft_loss_on)
    elif kind == "preference":
        records = read_preferences(cfg.data.train)
        data = tokenize_preferences(records, chat, L, cfg.data.overlong)
        if cfg.loss.reward_gap != "none":
            require_reward_gaps(data, cfg.loss.reward_gap, records)
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    if len(data) == 0:
        s = data.summary
        raise ConfigError(f"data.train={cfg.data.train}: no usable example out of {s.records} "
                          f"records (dropped: {s.dropped}; see data.overlong and "
                          f"train.seq_length={L})")
    data.check_vocab(cfg.model.vocab_size, str(cfg.data.train))
    pack = cfg.data.pack if pack is None else pack
    plan = (pack_best_fit_decreasing if pack else one_per_bin)(data.unit_lengths, L)
    return TrainingData(kind, files, data, plan, chat, tokenizer_fingerprint(tok),
                        fingerprint_files(files))
