"""`avr logps` under interleaved pipelining (PP=2 x VPP=2) when the last round of microbatches
is shorter than the pipeline: padded to a count Megatron's schedule accepts, padding dropped;
the stored log-probs equal the PP=1 run's."""

import pytest

from avr_megatron.testing.distributed import run_distributed
from avr_megatron.training.schedule import schedule_microbatches


def test_schedule_microbatches():
    assert [schedule_microbatches(n, 2, True) for n in (0, 1, 2, 3, 4, 5)] == [0, 2, 2, 4, 4, 6]
    assert [schedule_microbatches(n, 4, True) for n in (1, 5, 8)] == [4, 8, 8]
    assert schedule_microbatches(3, 2, False) == 3 and schedule_microbatches(3, 1, True) == 3


def _logps_case(tmp):
    from pathlib import Path

    import pyarrow.parquet as pq

    from avr_megatron.config import load_config
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.testing.distributed import save_initial_weights
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import preference_records, write_jsonl
    from avr_megatron.training.runs import run_logps

    tmp = Path(tmp)
    base = ["model.preset=tiny", "model.num_layers=4", "train.seq_length=128",
            "train.micro_batch_size=1", "train.global_batch_size=2", "data.pack=false",
            "data.overlong=truncate", "logps.save_every=2", f"data.tokenizer={tmp / 'tok'}",
            f"data.train={tmp / 'pairs.jsonl'}", "logging.progress_bar=false"]
    if is_rank0():
        train_tiny_tokenizer(tmp / "tok")
        write_jsonl(preference_records(5, seed=7), tmp / "pairs.jsonl")
    init = [save_initial_weights(base, tmp / "init")]
    # PP=1 (DP=2), then PP=2 x VPP=2 (DP=1): 5 pairs, 2 per round -> rounds of 2, 2 and 1.
    run_logps(load_config(None, base + init + [f"logps.path={tmp / 'pp1'}"]), progress=False)
    run_logps(load_config(None, base + init + [
        f"logps.path={tmp / 'vpp'}", "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2"]), progress=False)
    if not is_rank0():
        return None
    return {name: pq.read_table(tmp / name / "logps.parquet").to_pydict()
            for name in ("pp1", "vpp")}


@pytest.mark.slow
def test_interleaved_logps_with_a_short_last_round_equal_pp1(tmp_path):
    tables = run_distributed(_logps_case, nproc=2, timeout=300, tmp=str(tmp_path))[0]
    pp1, vpp = ({rid: (c, r) for rid, c, r in zip(t["id"], t["chosen"], t["rejected"])}
                for t in (tables["pp1"], tables["vpp"]))
    assert len(pp1) == 5 and pp1.keys() == vpp.keys()
    for rid in pp1:
        assert max(abs(a - b) for a, b in zip(pp1[rid], vpp[rid])) < 1e-4, (rid, pp1[rid], vpp[rid])
