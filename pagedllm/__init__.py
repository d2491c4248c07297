"""pagedllm: a paged-KV-cache LLM inference engine and OpenAI-compatible server."""

from pagedllm import envs as _envs
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

# Before anything imports torch (none of the imports above does).
_envs.apply_openmp_defaults()

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the engine; import it lazily so `import pagedllm` stays light.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    if name == "EngineArgs":
        from pagedllm.engine.arg_utils import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")


__all__ = [
    "LLM",
    "EngineArgs",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestOutputKind",
    "__version__",
]
