"""Known library noise, silenced in one place (`quiet_known_noise`, called once by the CLI).

Each entry is a message we have read, understood and found to say nothing a user can act on:
Megatron-Core announcing its own deprecations or fallbacks on every process start, and the
torch.distributed renames Megatron has not followed yet. Anything not listed still shows;
AVR_LOG_LEVEL=DEBUG shows these too.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (category, message regex): Python warnings.
WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # megatron-core imports: which fused kernels it falls back from (`avr info` says which
    # code paths are active).
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    # megatron-core's TransformerConfig warns about its own default cuda_graph_scope.
    (UserWarning, r"full scope is deprecated"),
    # Imported by megatron-core whether or not a MIMO model is used.
    (UserWarning, r"MimoModelConfig is experimental"),
    # Megatron-Core's DDP still calls the old torch.distributed names.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                    r"deprecated"),
    # Megatron code reads .grad of non-leaf tensors; our CPU layer's TorchFunctionMode is where
    # the access surfaces on CPU.
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
)

# logger name -> message regex: log records.
LOG_RECORDS: dict[str, str] = {
    # GPTModel is the model class of megatron-core 0.19 we build on (HybridModel migration is
    # its own project); logged once per process.
    "megatron.core.models.gpt.gpt_model": r"GPTModel IS DEPRECATED",
    # Megatron computes the layout itself, as documented; the message asks callers to
    # pre-compute it for speed only.
    "megatron.core.distributed.distributed_data_parallel": r"full_param_layout not provided",
    # dist_checkpointing's own async writer, which we use; the suggested replacement (NVRx) is
    # another package.
    "megatron.core.dist_checkpointing.strategies.torch": r"MCore's async save is deprecated",
    # torch's extension builder on a machine without CUDA (CPU runs): expected there.
    "torch.utils.cpp_extension": r"No CUDA runtime is found",
}


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed = False


def quiet_known_noise() -> None:
    """Install the filters (idempotent). A no-op under AVR_LOG_LEVEL=DEBUG."""
    global _installed
    if _installed or os.environ.get("AVR_LOG_LEVEL", "").upper() == "DEBUG":
        return
    _installed = True
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message in LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_Drop(message))
