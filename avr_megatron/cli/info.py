"""`avr info`: versions, devices and the code paths this machine would take."""

from __future__ import annotations

import importlib.metadata
import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    from avr_megatron.models.llama import (
        grad_accumulation_fusion_available,
        transformer_engine_status,
    )

    cuda = torch.cuda.is_available()
    te_ok, te_reason = transformer_engine_status()
    fp8_ok, fp8_reason = False, "needs Transformer Engine"
    if te_ok:
        major, minor = torch.cuda.get_device_capability()
        fp8_ok = (major, minor) >= (8, 9)
        fp8_reason = f"compute capability {major}.{minor}" + ("" if fp8_ok else " < 8.9")
    return {
        "versions": {name: _version(dist) for name, dist in [
            ("avr-megatron", "avr-megatron"), ("torch", "torch"),
            ("megatron-core", "megatron-core"), ("transformer-engine", "transformer-engine"),
            ("vllm", "vllm"), ("nemo-run", "nemo-run"), ("transformers", "transformers"),
            ("datasets", "datasets"), ("apex", "apex")]},
        "cuda": {"available": cuda, "torch_cuda": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i)
                             for i in range(torch.cuda.device_count())] if cuda else []},
        "code_paths": {
            "layer_spec": "transformer_engine" if te_ok else "local",
            "transformer_engine": te_reason,
            "fp8": fp8_ok, "fp8_detail": fp8_reason,
            "gradient_accumulation_fusion": grad_accumulation_fusion_available(),
            "distributed_backend": "nccl" if cuda else "gloo",
            "cpu_compat_layer": "inactive (CUDA present)" if cuda
            else "active when a model is built (avr_megatron/runtime/cpu_compat.py)",
        },
    }


def run(args, cfg) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for name, v in info["versions"].items():
        print(f"  {name:20s} {v or 'not installed'}")
    c = info["cuda"]
    print(f"cuda: {'available' if c['available'] else 'not available'} "
          f"(torch built for CUDA {c['torch_cuda']}) {', '.join(c['devices'])}")
    print("code paths:")
    for k, v in info["code_paths"].items():
        print(f"  {k:20s} {v}")
    return 0
