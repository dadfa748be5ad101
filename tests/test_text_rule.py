"""Training text that does not run out (plan.fit_self_text): a fixed self-generated corpus is never
read more than max_epochs times."""

from __future__ import annotations

import dataclasses

import pytest

from binarize.recipe import Recipe
from binarize.train.plan import fit_self_text, plan_budget


@pytest.mark.parametrize("spec, tokens, corpus, want", [
    ("self", 200_000, 40_960, True),  # ~5x -> 2x
    ("self", 64_000, 40_960, None),  # 1.6x: kept
    ("self+ptb:0.5", 200_000, 40_960, True),  # the self half reads ~100k: 2.4x -> grown
    ("ptb", 200_000, 40_960, None),  # no self text in the mix
    ("self", 0, 40_960, None),  # --tokens 0 trains on nothing
])
def test_a_fixed_corpus_is_enlarged_so_no_token_is_read_more_than_twice(spec, tokens, corpus, want):
    r = Recipe(seq_len=256, batch_tokens=1024, self_tokens=corpus, data=spec).validate()
    budget = plan_budget(r, tokens)
    fitted, notice = fit_self_text(r, tokens, spec)  # no calibration held out of the corpus here
    frac = 0.5 if "+" in spec else 1.0
    if want is None:
        assert fitted.self_tokens == corpus and notice is None
    else:
        assert "no token is seen more than 2 times" in notice
        assert fitted.self_tokens == -(-int(budget.tokens_used * frac) // 2)  # ceil: exactly 2 epochs at most
        assert budget.tokens_used * frac / fitted.self_tokens <= 2.0
    off, notice = fit_self_text(Recipe(seq_len=256, batch_tokens=1024, self_tokens=corpus, max_epochs=0).validate(),
                                tokens, spec)
    assert off.self_tokens == corpus and notice is None


def test_the_calibration_held_out_of_the_corpus_does_not_count_as_training_text():
    r = Recipe(seq_len=64, batch_tokens=256, chunks=4, self_tokens=768, data="self").validate()
    fitted, _ = fit_self_text(r, 2048, "self", held_out=256)
    assert fitted.self_tokens == 1024 + 256  # 2,048 training tokens at most twice, plus the calibration
    kept, notice = fit_self_text(dataclasses.replace(r, self_tokens=1280), 2048, "self", held_out=256)
    assert kept.self_tokens == 1280 and notice is None
    grown, notice = fit_self_text(dataclasses.replace(r, self_tokens=200), 2048, "self", held_out=256)
    assert grown.self_tokens == 1280 and "calibration takes all of it" in notice
