"""Incremental detokenization and stop-string matching for one request.

Text is decoded with the `tokenizers` DecodeStream primed with the prompt's tail, so it never
emits half a UTF-8 character and keeps the leading-space behaviour of the full decode.

A request whose text nobody reads before it finishes (FINAL_ONLY, no stop strings) defers the
decoding: its tokens go through the stream in one call when the text is first asked for (one
decode instead of one per token); should that call hold text back (an unfinished character at
the end, or nothing printable), the tokens are replayed one at a time on a fresh stream, so the
text is always the token-by-token result.
"""

from __future__ import annotations

from pagedllm.sampling_params import SamplingParams

_PRIME_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
        defer: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.output_text = ""
        self.token_ids: list[int] = []
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        # Text held back while it could still be the start of a stop string.
        self.stop_buffer_length = (
            max((len(s) for s in self.stop), default=1) - 1 if not self.include_stop else 0
        )
        self._last_sent = 0
        self._stream = None
        self._fast = getattr(tokenizer, "_tokenizer", None)
        self._prefix_text = None
        self._tail = list(prompt_token_ids[-_PRIME_TOKENS:])
        # Tokens not decoded yet (deferred mode); None: decode as they come.
        self._deferred: list[int] | None = None
        if params.detokenize and self._fast is not None:
            self._stream = self._new_stream()
            if defer and not self.stop:
                self._deferred = []

    def _new_stream(self):
        from tokenizers.decoders import DecodeStream

        skip = self.params.skip_special_tokens
        try:
            return DecodeStream(ids=list(self._tail), skip_special_tokens=skip)
        except TypeError:  # older tokenizers: no priming
            return DecodeStream(skip_special_tokens=skip)

    def update(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Appends tokens; returns the stop string that matched, if any (text is truncated)."""
        self.token_ids.extend(new_token_ids)
        if not self.params.detokenize:
            return None
        if self._deferred is not None:
            self._deferred.extend(new_token_ids)
            return None  # no stop strings (else nothing is deferred)
        before = len(self.output_text)
        stream = self._stream
        if stream is not None:
            fast = self._fast
            for t in new_token_ids:
                piece = stream.step(fast, t)
                if piece:
                    self.output_text += piece
        else:
            text = self.tokenizer.decode(
                self.token_ids, skip_special_tokens=self.params.skip_special_tokens
            )
            if not text.endswith("\ufffd"):
                self.output_text = text
        if not check_stop or not self.stop:
            return None
        return self._check_stop_strings(before)

    def _check_stop_strings(self, before: int) -> str | None:
        text = self.output_text
        hit_at, hit = None, None
        for s in self.stop:
            start = max(0, before - len(s) + 1)
            idx = text.find(s, start)
            if idx != -1 and (hit_at is None or idx < hit_at):
                hit_at, hit = idx, s
        if hit is None:
            return None
        self.output_text = text[: hit_at + len(hit)] if self.include_stop else text[:hit_at]
        return hit

    def _flush(self) -> None:
        """Decodes the deferred tokens (see the module docstring)."""
        ids, self._deferred = self._deferred, []
        if not ids:
            return
        fresh = not self.output_text and len(self.token_ids) == len(ids)
        piece = self._stream.step(self._fast, ids) if fresh and len(ids) > 1 else None
        if piece is not None:
            self.output_text += piece
            return
        if fresh and len(ids) > 1:
            self._stream = self._new_stream()  # the batched call left its ids in the stream
        for t in ids:
            piece = self._stream.step(self._fast, t)
            if piece:
                self.output_text += piece

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """All text so far (or the new part), minus the held-back tail unless finished."""
        if self._deferred:
            self._flush()
        length = len(self.output_text)
        if not finished:
            length = max(self._last_sent if delta else 0, length - self.stop_buffer_length)
        if not delta:
            return self.output_text[:length]
        text = self.output_text[self._last_sent : length]
        self._last_sent = length
        return text
