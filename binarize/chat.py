"""``binarize chat``: streaming generation with the tokenizer's chat template, through the static-cache
decode loop of ``binarize.decode`` (greedy unless a temperature is given)."""

from __future__ import annotations

import sys
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
    compile: bool = False  # capture the decode step (torch.compile reduce-overhead); off until a GPU run checks it
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
        from .decode import decode

        out = sys.stdout if out is None else out
        self.history.append({"role": "user", "content": text})
        ids = self._inputs()
        new: list[int] = []
        shown = 0

        def stream(token: torch.Tensor) -> None:  # print the text the new token completes
            nonlocal shown
            new.append(int(token[0]))
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                out.write(text[shown:])
                out.flush()
                shown = len(text)

        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        decode(self.model, ids, self.max_new_tokens, eos_token_id=gen_eos if gen_eos is not None
               else self.tokenizer.eos_token_id,
               temperature=self.temperature, top_p=self.top_p, seed=self.seed, on_token=stream,
               compile=self.compile)
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        out.write(answer[shown:] + "\n")
        answer = answer.strip()
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
