"""A checkpoint written by the trainer at TP=2 (distributed optimizer and scheduler state
included, padded vocab, tokenizer carried with `hf_assets_from`) exports to HF: the HF weights
are the trained weights and transformers' logits equal Megatron's."""

import pytest
import torch
from safetensors.torch import load_file

from avr_megatron.conversion import convert_mcore_to_hf
from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _train_and_save(root, tokens, assets):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from avr_megatron.checkpoint.dist_ckpt import save_checkpoint
    from avr_megatron.config import load_config
    from avr_megatron.testing.state import gather_full
    from avr_megatron.training.smoke import run_smoke

    cfg = load_config(None, [
        "model.preset=tiny", "model.vocab_size=500", "parallel.tensor_model_parallel_size=2",
        "train.train_iters=3", "train.seq_length=16", "train.global_batch_size=2",
        "train.micro_batch_size=2", "optimizer.lr=0.01", f"run.dir={root}/run"])
    run = run_smoke(cfg, progress=False)
    save_checkpoint(f"{root}/ckpt", 3, run.chunks, cfg, optimizer=run.optimizer,
                    scheduler=run.scheduler, hf_assets_from=assets)
    model = run.chunks[0]
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    logits = gather_from_tensor_model_parallel_region(logits)[..., :cfg.model.vocab_size]
    return {"logits": logits, "weights": gather_full(run.chunks, tied=False)}


def test_trainer_checkpoint_at_tp2_exports(tmp_path, tokenizer_dir, reference):
    from transformers import LlamaForCausalLM

    from avr_megatron.checkpoint.dist_ckpt import read_config, read_meta

    tokens = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    result = run_distributed(_train_and_save, nproc=2, root=str(tmp_path), tokens=tokens,
                             assets=str(tokenizer_dir))[0]
    ckpt = tmp_path / "ckpt"
    assert read_meta(ckpt)["has_optimizer"]
    out = convert_mcore_to_hf(ckpt, tmp_path / "hf", progress=False)  # tokenizer from hf/

    m = read_config(ckpt).model
    hf = load_file(out / "model.safetensors")
    reference.assert_same(result["weights"], reference.weights(hf, m), m.vocab_size)
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.vocab_size == 500 and model.config.num_key_value_heads == 2
    with torch.no_grad():
        hf_logits = model(tokens).logits
    assert (hf_logits - result["logits"]).abs().max().item() < 1e-5
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
