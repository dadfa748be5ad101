"""``binarize chat``: streaming generation with the tokenizer's chat template."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

import torch

from .errors import BinarizeError


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    name: str
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, spec: str | None, cpu_cache: str | None = None, **kw) -> "ChatSession":
        from .loading import load_any

        model, tok, name = load_any(spec, cpu_cache=cpu_cache)
        if getattr(tok, "chat_template", None) is None:
            raise BinarizeError(f"{name}: the tokenizer has no chat template")
        return cls(model, tok, name, **kw)

    def _inputs(self) -> torch.Tensor:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        return ids.to(next(self.model.parameters()).device)

    def reply(self, text: str, out=None) -> str:
        """Stream the model's answer to ``text`` to ``out`` (default: the current ``sys.stdout``, looked
        up per call, not bound at import); the turn is kept in the history."""
        from transformers import TextIteratorStreamer

        out = sys.stdout if out is None else out
        self.history.append({"role": "user", "content": text})
        ids = self._inputs()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = self.temperature > 0
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                      do_sample=sample, streamer=streamer, pad_token_id=self.tokenizer.eos_token_id)
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(self.seed)
        errors: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread
                errors.append(exc)
                streamer.on_finalized_text("", stream_end=True)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        parts = []
        for piece in streamer:
            parts.append(piece)
            out.write(piece)
            out.flush()
        worker.join()
        out.write("\n")
        if errors:
            raise errors[0]
        answer = "".join(parts).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def interactive(self) -> None:
        print(f"{self.name}: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                text = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                self.history.clear()
                continue
            if text:
                self.reply(text)
