"""Structured outputs: grammar-constrained decoding.

`StructuredOutputManager` (manager.py) owns compilation (a thread pool, a cache by key) and the
per-request matchers; the scheduler asks it which requests are ready and for the step's token
bitmask; the sampler only applies that mask. One module per grammar library
(`backend_xgrammar.py`, `backend_guidance.py`) behind the interface in `backend.py`.
"""

from pagedllm.structured_output.backend import BACKENDS, GrammarSpec, grammar_spec
from pagedllm.structured_output.manager import (
    GrammarBitmask,
    RequestGrammar,
    StructuredOutputManager,
    validate_structured_outputs,
)

__all__ = [
    "BACKENDS",
    "GrammarBitmask",
    "GrammarSpec",
    "RequestGrammar",
    "StructuredOutputManager",
    "grammar_spec",
    "validate_structured_outputs",
]
