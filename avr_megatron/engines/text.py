"""A reply's text from its sampled token ids: one rule for every chat backend (transformers, vLLM
offline and async, a vLLM server's returned ids), so the same tokens read the same whichever
engine sampled them. The text feeds the tree's criticise and improve prompts and the reward, so a
difference here makes whole trees diverge.

The rule: drop the stop (EOS) ids, those of the tokenizer and of the model's generation config
(vLLM returns the stop token it ended on; our transformers loop stops before it), then
`tokenizer.decode(..., skip_special_tokens=True)`. An incomplete UTF-8 sequence at the end of a
reply cut by max_tokens becomes U+FFFD, as `decode` writes it (vLLM's incremental detokenizer
would drop it instead).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """The ids a reply stops at: `tokenizer.eos_token_id` and the generation config's
    `eos_token_id` (an int or a list). `generation_config`: a mapping (vLLM's
    `try_get_generation_config()`, a generation_config.json) or an object with `eos_token_id`
    (transformers' GenerationConfig), or None."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(generation_config, Mapping):
        extra = generation_config.get("eos_token_id")
    else:
        extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(t) for t in extra)
    return ids


def generation_config_file(model_dir: str | Path) -> dict[str, Any]:
    """The model directory's generation_config.json ({} when it has none), read without
    transformers' GenerationConfig (which fills in defaults)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def reply_ids(token_ids: Iterable[int], eos: set[int]) -> list[int]:
    """A reply's token ids without its stop ids."""
    return [int(t) for t in token_ids if t not in eos]


def reply_text(tokenizer: Any, token_ids: Iterable[int], eos: set[int]) -> str:
    """The text of a reply sampled as `token_ids` (with or without its stop token)."""
    return tokenizer.decode(reply_ids(token_ids, eos), skip_special_tokens=True)
