"""POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's extra endpoints)."""

from __future__ import annotations

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        self.check_request(req.model)
        if isinstance(req, TokenizeChatRequest):
            chat = OpenAIServingChat(self.engine, self.config)
            text = chat.render(req, req.tools)  # same template rules as /v1/chat/completions
        else:
            text = req.prompt
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        body: dict = {"count": len(ids), "max_model_len": self.engine.max_model_len,
                      "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return body

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_request(req.model)
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"tokens: token id {bad[0]} is out of vocabulary (size {vocab})", 400,
                           param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        tok = self.tokenizer
        info = {
            "tokenizer_class": type(tok).__name__,
            "vocab_size": len(tok),
            "model_max_length": self.engine.max_model_len,
            "chat_template": self.config.chat_template or getattr(tok, "chat_template", None),
        }
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = value if isinstance(value, str) else None
        info["add_bos_token"] = getattr(tok, "add_bos_token", None)
        return info
