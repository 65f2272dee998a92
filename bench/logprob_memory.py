"""Peak memory of per-token log-probs (forward + backward) at a 128k vocabulary: our chunked
vocab-parallel computation (avr_megatron.training.logprobs) against a full-vocabulary
`log_softmax` in fp32, on the logits a bf16 model produces.

Each variant runs in a fresh process; the peak is the process's high-water resident memory
(VmHWM, reset through /proc/self/clear_refs just before the computation) minus the memory held
before it (logits, labels), so it is what the computation itself adds, allocator effects
included. On a GPU the same comparison holds for device memory (not measured here: no GPU).

    python bench/logprob_memory.py [--tokens 2048] [--vocab 128256] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import table, write

_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
variant, tokens, vocab, dtype, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sys.path.insert(0, sys.argv[6])
from avr_megatron.training.logprobs import token_logprobs

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

g = torch.Generator().manual_seed(0)
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
logits = torch.randn(tokens, vocab, generator=g).to(dt).requires_grad_()
labels = torch.randint(0, vocab, (tokens,), generator=g)
mask = torch.ones(tokens, dtype=torch.bool)
weights = torch.randn(tokens, generator=g)
base = rss_kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
t0 = time.time()
if variant == "full_log_softmax":
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None])[:, 0]
else:
    logp = token_logprobs(logits, labels, mask, vocab, chunk_size=chunk)
(logp * weights).sum().backward()
seconds = time.time() - t0
peak = rss_kb("VmHWM:")
print(json.dumps({"extra_peak_bytes": (peak - base) * 1024, "seconds": seconds,
                  "logits_bytes": logits.numel() * logits.element_size(),
                  "grad_dtype": str(logits.grad.dtype), "logp_sum": float(logp.sum())}))
"""


def run(variant: str, tokens: int, vocab: int, dtype: str, chunk: int) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _CHILD, variant, str(tokens), str(vocab), dtype,
                          str(chunk), repo], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2048,4096", help="comma-separated token counts")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--chunk", type=int, default=0, help="rows per chunk; 0: auto")
    args = ap.parse_args(argv)
    gib = 1 << 30
    rows, cases = [], []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        full = run("full_log_softmax", tokens, args.vocab, args.dtype, args.chunk)
        ours = run("chunked_vocab_parallel", tokens, args.vocab, args.dtype, args.chunk)
        ratio = full["extra_peak_bytes"] / ours["extra_peak_bytes"]
        for name, r in (("full-vocab log_softmax (fp32)", full),
                        (f"chunked vocab-parallel (chunk {args.chunk or 'auto'})", ours)):
            rows.append({"tokens": tokens, "computation": name,
                         "logits_GiB": r["logits_bytes"] / gib,
                         "extra_peak_GiB": r["extra_peak_bytes"] / gib, "seconds": r["seconds"]})
        cases.append({"tokens": tokens, "logits_bytes": full["logits_bytes"],
                      "full_log_softmax_extra_peak_bytes": full["extra_peak_bytes"],
                      "chunked_extra_peak_bytes": ours["extra_peak_bytes"],
                      "full_vs_chunked_peak_memory": ratio,
                      "full_log_softmax_seconds": full["seconds"],
                      "chunked_seconds": ours["seconds"],
                      "logp_sum_abs_difference": abs(full["logp_sum"] - ours["logp_sum"])})
    print(f"vocab {args.vocab}, {args.dtype} logits, forward + backward, extra peak memory:")
    print(table(rows, ["tokens", "computation", "logits_GiB", "extra_peak_GiB", "seconds"]))
    for c in cases:
        print(f"{c['tokens']} tokens: full log_softmax needs {c['full_vs_chunked_peak_memory']:.2f}x "
              f"the extra memory of ours, which is the logits' own gradient "
              f"({c['logits_bytes'] / gib:.2f} GiB, needed by any method) plus one chunk")
    write("logprob_memory", {
        "config": {"vocab": args.vocab, "logits_dtype": args.dtype, "chunk_size": args.chunk,
                   "device": "cpu", "method": "process VmHWM after clear_refs minus VmRSS before"},
        "full_vs_chunked_peak_memory": cases[-1]["full_vs_chunked_peak_memory"],
        "cases": cases})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
