#!/usr/bin/env python
"""Megatron dist checkpoint (any TP/PP) -> Hugging Face directory; same as
`avr convert mcore-to-hf`.

    python tools/convert_megatron_to_hf.py --ckpt CKPT --out DIR [--dtype bf16] [--tokenizer DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avr_megatron.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
