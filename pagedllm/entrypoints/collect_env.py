"""`pagedllm collect-env`: what a bug report needs: versions, devices, the environment.

Prints `name: value` lines in sections. Environment variables that configure pagedllm, CUDA,
Triton, torch, OpenMP or the HF hub are listed; any whose name suggests a secret (TOKEN, KEY,
SECRET, PASSWORD) shows as `***`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

PACKAGES = ("pagedllm", "torch", "triton", "transformers", "tokenizers", "safetensors", "gguf",
            "numpy", "fastapi", "uvicorn", "pydantic", "msgspec", "pyzmq", "prometheus_client",
            "bitsandbytes")
ENV_PREFIXES = ("PAGEDLLM_", "VLLM_", "CUDA_", "NCCL_", "TRITON_", "TORCH_", "OMP_", "MKL_",
                "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "PYTORCH_", "NVIDIA_")
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {e}"
    return (done.stdout or done.stderr).strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _torch_section() -> list[tuple[str, str]]:
    try:
        import torch
    except ImportError as e:
        return [("torch", f"cannot import: {e}")]
    rows = [("torch", torch.__version__), ("torch CUDA build", str(torch.version.cuda)),
            ("torch threads", str(torch.get_num_threads())),
            ("CUDA available", str(torch.cuda.is_available()))]
    if torch.cuda.is_available():
        rows.append(("CUDA devices", str(torch.cuda.device_count())))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, "
                                     f"compute {p.major}.{p.minor}"))
    return rows


def environment_variables(environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    environ = os.environ if environ is None else environ
    rows = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIXES):
            continue
        secret = any(word in name.upper() for word in SECRET_WORDS)
        rows.append((name, "***" if secret else environ[name]))
    return rows


def collect() -> dict[str, list[tuple[str, str]]]:
    """Section title -> rows of (name, value)."""
    system = [("OS", platform.platform()), ("Python", sys.version.split()[0]),
              ("Python executable", sys.executable), ("CPU", _cpu_model()),
              ("CPU cores", str(os.cpu_count()))]
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader"])
    system.append(("nvidia-smi", smi if smi is not None else "not found"))
    return {
        "System": system,
        "Packages": [(name, _version(name)) for name in PACKAGES],
        "PyTorch": _torch_section(),
        "Environment": environment_variables(),
    }


def render(sections: dict[str, list[tuple[str, str]]]) -> str:
    lines = []
    for title, rows in sections.items():
        lines.append(f"== {title} ==")
        lines.extend(f"{name}: {value}" for name, value in rows)
        lines.append("")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    print(render(collect()))
    return 0


def register_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "collect-env", help="print versions, devices and environment for a bug report")
    parser.set_defaults(func=_cmd)
