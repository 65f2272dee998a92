"""Training from a Hugging Face checkpoint and exporting back, through the conversion package:
the model shape comes from config.json, the first step's policy log-probs equal the HF model's,
and the exported directory holds the trained weights. Skipped where the conversion package is
not part of the build."""

import pytest

from avr_megatron.testing.distributed import run_distributed


def _conversion_available() -> bool:
    try:  # import, not find_spec: the package must also fit this checkout's modules
        import avr_megatron.conversion  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not _conversion_available(),
    reason="needs avr_megatron.conversion (HF <-> Megatron converter)")]


def _case(tmp):
    import json
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from avr_megatron.config import load_config
    from avr_megatron.testing.tiny_hf import make_tiny_llama
    from avr_megatron.testing.toy_data import preference_records, write_jsonl
    from avr_megatron.training.runs import run_dpo

    tmp = Path(tmp)
    hf_dir = make_tiny_llama(tmp / "hf", seed=3)
    write_jsonl(preference_records(8, seed=4), tmp / "pairs.jsonl")
    cfg = load_config(None, [
        "model.preset=tiny", f"model.init_from.hf={hf_dir}", f"data.train={tmp / 'pairs.jsonl'}",
        "loss.reference=online", "train.seq_length=128", "train.micro_batch_size=1",
        "train.global_batch_size=1", "train.train_iters=1", "optimizer.lr=1e-12",
        "scheduler.warmup_iters=0", f"run.dir={tmp / 'run'}", "logging.progress_bar=false",
        f"checkpoint.export_hf={tmp / 'exported'}"])
    result = run_dpo(cfg, progress=False)
    first = json.loads((tmp / "run" / "metrics.jsonl").read_text().splitlines()[0])

    # the same pairs through the HF model (the first global batch: bin order of step 0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).float().eval()
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.data.sampler import StepSampler

    td = load_training_data(cfg, "preference")
    b = StepSampler(td.plan.num_bins, 1, cfg.run.seed).global_batch(0)[0]
    chosen = []
    for u in td.plan.bin(int(b)):
        ids, mask = td.data.sequence(2 * int(u))
        t = torch.as_tensor(ids, dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(t).logits[0, :-1].float(), -1)
        picked = logp.gather(1, t[0, 1:, None])[:, 0]
        chosen.append(float(picked[torch.as_tensor(mask[1:])].sum()))
    exported = LlamaForCausalLM.from_pretrained(tmp / "exported").float()
    weight_err = max((a - b).abs().max().item() for a, b in
                     zip(hf.state_dict().values(), exported.state_dict().values()))
    # The run's config.yaml is the resolved config: the model shape from config.json.
    saved = load_config(str(tmp / "run" / "config.yaml"))
    return {"vocab": saved.model.vocab_size, "tokenizer": len(tok),
            "logps_chosen": first["logps/chosen"], "hf_logps_chosen": sum(chosen) / len(chosen),
            "loss": first["loss"], "weight_err": weight_err, "init": result.summary["init"],
            "exported": result.summary["exported_hf"]}


def test_hf_init_and_export(tmp_path):
    r = run_distributed(_case, nproc=1, tmp=str(tmp_path))[0]
    assert r["vocab"] == r["tokenizer"], r  # shape taken from config.json, not the preset
    assert r["init"].startswith("hf:") and r["exported"], r
    assert abs(r["logps_chosen"] - r["hf_logps_chosen"]) < 1e-3, r
    assert abs(r["loss"] - 0.6931471805599453) < 1e-6, r  # policy == reference at step 1
    assert r["weight_err"] < 1e-5, r
