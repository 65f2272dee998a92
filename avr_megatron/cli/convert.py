"""`avr convert hf-to-mcore` / `avr convert mcore-to-hf` (see avr_megatron/conversion).

Like every command they take `--recipe` + overrides: for hf-to-mcore the recipe supplies what
config.json does not describe (e.g. `model.make_vocab_size_divisible_by`, the parallel layout
when --tp/--pp are not given) and is stored, with the HF model filled in, as the checkpoint's
config.yaml. mcore-to-hf reads everything from the checkpoint.
"""

from __future__ import annotations

import sys

_DTYPES = ("bf16", "fp16", "fp32")


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def add_hf_to_mcore_arguments(parser) -> None:
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--out", required=True, help="checkpoint root to create (must not exist)")
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size the checkpoint is chunked for (default: "
                             "recipe's parallel.tensor_model_parallel_size); loads under any")
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline-parallel size recorded in the checkpoint's config "
                             "(default: the recipe's); loads under any")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="weight dtype to store (default: the HF config's dtype)")
    parser.add_argument("--max-chunk-size", type=_size, default=None,
                        help="largest stored chunk, e.g. 64MiB (default): bounds conversion "
                             "memory")
    parser.add_argument("--no-progress", action="store_true")


def add_mcore_to_hf_arguments(parser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint directory, or a root holding `latest` / iter_*")
    parser.add_argument("--out", required=True, help="HF directory to create (must not exist)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="weight dtype to write (default: the checkpoint's)")
    parser.add_argument("--tokenizer", default=None,
                        help="folder with tokenizer files, for checkpoints without an hf/ folder")
    parser.add_argument("--max-shard-size", type=_size, default=5 * 10**9,
                        help="largest safetensors shard, e.g. 5GB (default)")
    parser.add_argument("--no-progress", action="store_true")


def _fail(command: str, error: Exception) -> int:
    print(f"avr convert {command}: error: {error}", file=sys.stderr)
    return 2


def run_hf_to_mcore(args, cfg) -> int:
    from avr_megatron.conversion import ConversionError, convert_hf_to_mcore

    extra = {} if args.max_chunk_size is None else {"max_chunk_bytes": args.max_chunk_size}
    try:
        out = convert_hf_to_mcore(args.hf_dir, args.out, base=cfg, tp=args.tp, pp=args.pp,
                                  dtype=args.dtype, progress=not args.no_progress, **extra)
    except ConversionError as e:
        return _fail("hf-to-mcore", e)
    print(f"hf-to-mcore: wrote {out}")
    return 0


def run_mcore_to_hf(args, cfg) -> int:
    from avr_megatron.conversion import ConversionError, convert_mcore_to_hf

    try:
        out = convert_mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                                  max_shard_bytes=args.max_shard_size,
                                  progress=not args.no_progress)
    except ConversionError as e:
        return _fail("mcore-to-hf", e)
    print(f"mcore-to-hf: wrote {out}")
    return 0
