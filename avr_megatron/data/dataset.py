"""From the recipe to packed training data: read records, tokenise with the chat template,
apply the over-length rule, pack.

With data.prepared=auto|required (default auto) the tokenised form is built once into
memory-mapped files (`avr_megatron.data.prepare`) and every rank maps it; with in_memory every
rank tokenises the data itself. Both give exactly the same examples, packing plan and batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.data.chat import ChatTokenizer, load_tokenizer, tokenizer_fingerprint
from avr_megatron.data.fingerprint import fingerprint_files
from avr_megatron.data.packing import PackingPlan, one_per_bin, pack_best_fit_decreasing
from avr_megatron.data.records import read_records, resolve_files
from avr_megatron.data.tokenized import (
    TokenizedDataset,
    require_reward_gaps,
    tokenize_preferences,
    tokenize_sft,
)

SPLITS = ("train", "valid")


@dataclass
class TrainingData:
    kind: str  # sft | preference
    files: list[Path]
    data: TokenizedDataset
    plan: PackingPlan
    chat: ChatTokenizer
    tokenizer_fingerprint: str
    files_fingerprint: str
    split: str = "train"
    prepared: Path | None = None  # the prepared directory mapped, None when tokenised here
    # Collate pairs with their shared prompt laid out once (data/batches.py collate)
    share_prompt: bool = False

    def summary(self) -> dict:
        return {"files": [str(f) for f in self.files], "files_fingerprint": self.files_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "examples_fingerprint": self.data.fingerprint(),
                "prepared": str(self.prepared) if self.prepared else None,
                **self.data.summary.as_dict(), "packing": self.plan.stats()}


def tokenizer_path(cfg: AvrConfig) -> str:
    path = cfg.data.tokenizer or cfg.model.init_from.hf
    if path is None:
        raise ConfigError("data.tokenizer is not set (nor model.init_from.hf to take it from): "
                          "name the Hugging Face tokenizer directory whose chat template to use")
    return path


def data_path(cfg: AvrConfig, split: str) -> str:
    path = getattr(cfg.data, split)
    if path is None:
        if split == "train":
            raise ConfigError("data.train is not set: name the training data (a Parquet/JSONL "
                              "file, a directory of shards or a glob)")
        raise ConfigError(f"data.{split} is not set")
    return path


def prepared_root(cfg: AvrConfig, split: str) -> Path:
    """Where the prepared versions of data.<split> are kept."""
    if cfg.data.prepared_dir:
        return Path(cfg.data.prepared_dir) / split
    path = data_path(cfg, split)
    if any(ch in path for ch in "*?["):
        return Path(cfg.run.dir) / "prepared" / split
    p = Path(path.rstrip("/"))
    return p.with_name(p.name + ".prepared")


def _check_root(root: Path, files: list[Path], source: str) -> None:
    """Keep prepared data out of the data directory it was built from."""
    root = root.resolve()
    for f in files:
        if root in f.resolve().parents:
            raise ConfigError(f"data.prepared_dir ({root}) is inside the data directory of "
                              f"{source}: choose a directory outside it")


def load_training_data(cfg: AvrConfig, kind: str, *, split: str = "train",
                       pack: bool | None = None, progress: bool = False,
                       share_prompt: bool = False) -> TrainingData:
    """kind: "sft" or "preference"; split: "train" or "valid" (data.train / data.valid).
    pack=None follows data.pack. share_prompt: batches of this data lay each pair's shared
    prompt out once (`TrainingData.share_prompt`; `config.validate.resolve_share_prompt` says
    where the model supports it)."""
    from avr_megatron.data.prepare import Settings, ensure_prepared, prepared_key

    if kind not in ("sft", "preference"):
        raise ValueError(f"unknown data kind {kind!r}")
    source = data_path(cfg, split)
    files = resolve_files(source)
    tok_path = tokenizer_path(cfg)
    tok = load_tokenizer(tok_path)
    chat = ChatTokenizer(tok)
    L = cfg.train.seq_length
    files_fp, tok_fp = fingerprint_files(files), tokenizer_fingerprint(tok)
    pack = cfg.data.pack if pack is None else pack
    prepared = None
    if cfg.data.prepared == "in_memory":
        records = read_records(kind, source)
        if kind == "sft":
            data = tokenize_sft(records, chat, L, cfg.data.overlong, cfg.data.sft_loss_on)
        else:
            data = tokenize_preferences(records, chat, L, cfg.data.overlong)
        del records
        plan = None
    else:
        from avr_megatron.data.prepared import open_prepared

        settings = Settings(kind, str(tok_path), L, cfg.data.overlong, cfg.data.sft_loss_on)
        root = prepared_root(cfg, split)
        if cfg.data.prepared_dir:
            _check_root(root, files, f"data.{split}")
        prepared = ensure_prepared(root, prepared_key(settings, files_fp, tok_fp), settings,
                                   files, build=cfg.data.prepared == "auto",
                                   workers=cfg.data.prepare_workers, progress=progress)
        data, plan, _ = open_prepared(prepared, files)
    if kind == "preference" and cfg.loss.reward_gap != "none":
        require_reward_gaps(data, cfg.loss.reward_gap)
    if len(data) == 0:
        s = data.summary
        raise ConfigError(f"data.{split}={source}: no usable example out of {s.records} "
                          f"records (dropped: {s.dropped}; see data.overlong and "
                          f"train.seq_length={L})")
    data.check_vocab(cfg.model.vocab_size, str(source))
    if plan is None or not pack:
        plan = (pack_best_fit_decreasing if pack else one_per_bin)(data.unit_lengths, L)
    return TrainingData(kind, files, data, plan, chat, tok_fp, files_fp, split, prepared,
                        share_prompt=share_prompt and kind == "preference")
