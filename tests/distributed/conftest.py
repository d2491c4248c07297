"""Fixtures shared with the embedding tests (the real MiniLM directory)."""

from tests.embed.conftest import minilm_path  # noqa: F401
