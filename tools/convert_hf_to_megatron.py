#!/usr/bin/env python
"""Hugging Face Llama -> Megatron dist checkpoint; same as `avr convert hf-to-mcore`.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out CKPT [--tp N --pp N] [--dtype bf16]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avr_megatron.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
