"""Build, load and fall back for pagedllm's small C++ CPU extensions (GGUF kernels, CPU ops).

An extension is a set of C++ sources registering `torch.ops.<namespace>.*` operators.
`torch.utils.cpp_extension.load` compiles it with the system compiler into a cache directory
keyed by the sources' and headers' hash and the torch version, so a fresh machine needs no
manual step and an edited source rebuilds; the Makefile's venv target builds each one ahead
(`python -m <module> --build`) so tests and servers do not pay the compile. When a build fails
`available()` is False for the process, one warning is logged and callers keep their torch
path. `PAGEDLLM_<NAME>_FAIL=1` simulates a failed build (tests).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def _ninja_on_path() -> None:
    """The `ninja` pip package's binary (and the venv's bin) on PATH, where torch's
    extension builder looks for it, also when the venv is not activated."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


class CppExtension:
    """One JIT-built extension: `available()` builds and loads it once per process."""

    def __init__(
        self,
        name: str,  # library name prefix, e.g. "pagedllm_gguf"
        csrc: str,  # directory of the sources
        sources: Sequence[str],
        headers: Sequence[str],
        build_dir: Callable[[], str],  # read at build time (tests point it elsewhere)
        fail_env: str,  # "1" simulates a failed build
        fallback: str,  # what callers do instead, for the warning
        extra_cflags: Sequence[str] = ("-O3", "-fopenmp"),
        extra_ldflags: Sequence[str] = ("-fopenmp",),
    ) -> None:
        self.name = name
        self.csrc = csrc
        self.sources = tuple(sources)
        self.headers = tuple(headers)
        self.build_dir = build_dir
        self.fail_env = fail_env
        self.fallback = fallback
        self.extra_cflags = list(extra_cflags)
        self.extra_ldflags = list(extra_ldflags)
        self._lock = threading.Lock()
        self.state: dict[str, object] = {}  # "ok": bool, "error": str

    def ext_name(self) -> str:
        digest = hashlib.sha1()
        for name in (*self.sources, *self.headers):
            with open(os.path.join(self.csrc, name), "rb") as f:
                digest.update(f.read())
        digest.update(torch.__version__.encode())
        return f"{self.name}_{digest.hexdigest()[:12]}"

    def build(self) -> None:
        from torch.utils import cpp_extension

        _ninja_on_path()
        name = self.ext_name()
        build_dir = os.path.join(self.build_dir(), name)
        os.makedirs(build_dir, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[os.path.join(self.csrc, s) for s in self.sources],
            extra_cflags=list(self.extra_cflags),  # copies: load() appends to them
            extra_ldflags=list(self.extra_ldflags),
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )

    def available(self) -> bool:
        """Whether the extension is built and loaded (building it on the first call). A
        failed build logs one warning and stays failed for the process."""
        with self._lock:
            if "ok" not in self.state:
                if os.environ.get(self.fail_env) == "1":
                    self.state.update(ok=False, error=f"{self.fail_env}=1")
                else:
                    try:
                        self.build()
                        self.state["ok"] = True
                    except Exception as e:  # noqa: BLE001 - any build failure means fallback
                        self.state.update(ok=False, error=f"{type(e).__name__}: {e}")
                if not self.state["ok"]:
                    logger.warning(
                        "%s C++ extension could not be built (%s); %s", self.name,
                        str(self.state["error"]).splitlines()[0][:300], self.fallback,
                    )
            return bool(self.state["ok"])

    def reset_for_tests(self) -> None:
        with self._lock:
            self.state.clear()

    def build_main(self, description: str, describe: Callable[[], str]) -> None:
        """`python -m <module> --build`: builds now, exits non-zero when it cannot."""
        import argparse

        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--build", action="store_true", help="build the extension now")
        args = parser.parse_args()
        if args.build:
            logging.basicConfig(level=logging.INFO)
            if not self.available():
                raise SystemExit(f"{self.name} not built: {self.state.get('error')}")
            print(describe())
