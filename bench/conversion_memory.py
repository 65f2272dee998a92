"""Peak memory of checkpoint conversion relative to the checkpoint's size.

Builds a random Llama-3.2-1B-shaped HF model (1.24 B parameters, bf16, tied embeddings; written
tensor by tensor, never held whole), then runs, each in a fresh process through the real CLI:

    avr convert hf-to-mcore   (TP=1: the biggest chunks)
    avr convert mcore-to-hf   (from the checkpoint just written)

and a process that only imports the converter (the interpreter + torch floor). Peak RSS comes
from the kernel's accounting of each child (wait4 ru_maxrss). A child's ru_maxrss starts from its
parent's RSS at fork time, so this script keeps torch out of the parent until every measurement
is done (the model is generated in a child too). The round trip is then checked tensor by tensor
for bit-identity. Writes bench/results/conversion_memory.json.

    python bench/conversion_memory.py [--work DIR] [--preset llama3.2-1b] [--keep]

Takes a few minutes on a 2-core CPU and ~8 GB of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_random_hf(folder: Path, preset: str, seed: int = 0) -> int:
    """A random HF Llama of the preset's shape in bf16 (one safetensors file); returns bytes."""
    import torch

    from avr_megatron.config import load_config
    from avr_megatron.conversion.hf_config import hf_config_from_model
    from avr_megatron.conversion.mapping import expected_hf
    from avr_megatron.conversion.safetensors_io import SafetensorsWriter
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer

    m = load_config(None, [f"model.preset={preset}"]).model
    folder.mkdir(parents=True)
    specs = [(n, torch.bfloat16, s) for n, s in expected_hf(m).items()]
    writer = SafetensorsWriter(folder / "model.safetensors", specs, {"format": "pt"})
    g = torch.Generator().manual_seed(seed)
    for name, dtype, shape in specs:
        rows = max(1, (64 << 20) // (2 * (shape[1] if len(shape) > 1 else 1)))
        for a in range(0, shape[0], rows):
            n = min(rows, shape[0] - a)
            piece = torch.randn((n, *shape[1:]), generator=g).mul_(0.02).to(dtype)
            writer.write(name, piece)
    writer.close()
    config = hf_config_from_model(m, torch.bfloat16, None,
                                  {"bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 5})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    train_tiny_tokenizer(folder)
    return (folder / "model.safetensors").stat().st_size


def _generate_main(folder: str, preset: str) -> int:
    size = make_random_hf(Path(folder), preset)
    print(f"random {preset} HF model: {size / 1e9:.2f} GB")
    return 0


def run_measured(args: list[str]) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of a child process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    start = time.time()
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit code {proc.returncode}")
    return usage.ru_maxrss * 1024, time.time() - start


def same_tensors(a: Path, b: Path) -> int:
    """Compare two single-file HF models tensor by tensor; returns the tensor count."""
    import torch

    from avr_megatron.conversion.safetensors_io import SafetensorsFile

    fa, fb = SafetensorsFile(a), SafetensorsFile(b)
    if fa.tensors.keys() != fb.tensors.keys():
        raise SystemExit(f"tensor names differ: {fa.tensors.keys() ^ fb.tensors.keys()}")
    for name in fa.tensors:
        if not torch.equal(fa.read(name), fb.read(name)):
            raise SystemExit(f"round trip changed {name}")
    return len(fa.tensors)


def count_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its header (no torch import)."""
    import math
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--generate-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate_only:
        return _generate_main(args.generate_only, args.preset)
    assert "torch" not in sys.modules, "the parent must stay light (see the module docstring)"
    work = args.work or Path(tempfile.mkdtemp(prefix="avr-conv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ckpt, back = work / "hf", work / "ckpt", work / "hf_back"
    for p in (hf, ckpt, back):
        shutil.rmtree(p, ignore_errors=True)
    try:
        _, t_gen = run_measured([__file__, "--generate-only", str(hf), "--preset", args.preset])
        hf_bytes = (hf / "model.safetensors").stat().st_size
        params = count_parameters(hf / "model.safetensors")
        print(f"generated in {t_gen:.0f} s")
        floor, _ = run_measured(["-c", "import avr_megatron.conversion, avr_megatron.cli.main"])
        run_dir = f"run.dir={work / 'run'}"
        to_mcore, t_to = run_measured(["-m", "avr_megatron.cli.main", "convert", "hf-to-mcore",
                                       "--hf-dir", str(hf), "--out", str(ckpt), "--tp", "1",
                                       "--no-progress", run_dir])
        ckpt_bytes = dir_bytes(ckpt / "iter_0000000") - dir_bytes(ckpt / "iter_0000000" / "hf")
        to_hf, t_back = run_measured(["-m", "avr_megatron.cli.main", "convert", "mcore-to-hf",
                                      "--ckpt", str(ckpt), "--out", str(back), "--no-progress",
                                      run_dir])
        n = same_tensors(hf / "model.safetensors", back / "model.safetensors")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [("import only (floor)", floor, None),
            ("hf-to-mcore", to_mcore, t_to), ("mcore-to-hf", to_hf, t_back)]
    result = {
        "preset": args.preset, "dtype": "bfloat16",
        "parameters": params,
        "hf_checkpoint_bytes": hf_bytes, "dist_checkpoint_bytes": ckpt_bytes,
        "import_floor_peak_rss_bytes": floor,
        "hf_to_mcore_peak_rss_bytes": to_mcore, "hf_to_mcore_seconds": round(t_to, 1),
        "mcore_to_hf_peak_rss_bytes": to_hf, "mcore_to_hf_seconds": round(t_back, 1),
        # The target: peak RSS / checkpoint size < 0.5 (size = the HF safetensors weights).
        "hf_to_mcore_peak_rss_over_checkpoint_size": round(to_mcore / hf_bytes, 3),
        "mcore_to_hf_peak_rss_over_checkpoint_size": round(to_hf / hf_bytes, 3),
        "import_floor_over_checkpoint_size": round(floor / hf_bytes, 3),
        "round_trip_bit_identical_tensors": n,
        "max_chunk_bytes": 64 << 20,
        "machine": f"{os.cpu_count()} CPUs",
    }
    print(f"\n{'step':22s} {'peak RSS GB':>12s} {'/ ckpt size':>12s} {'seconds':>8s}")
    for name, rss, secs in rows:
        print(f"{name:22s} {rss / 1e9:12.2f} {rss / hf_bytes:12.3f} "
              f"{'' if secs is None else f'{secs:8.0f}'}")
    print(f"checkpoint: {hf_bytes / 1e9:.2f} GB (HF safetensors), {ckpt_bytes / 1e9:.2f} GB "
          f"(torch_dist); round trip bit-identical over {n} tensors")
    out = REPO / "bench" / "results" / "conversion_memory.json"
    from avr_megatron.runtime.files import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    ok = max(to_mcore, to_hf) / hf_bytes < 0.5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
