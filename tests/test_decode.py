"""The static-cache decode loop (binarize/decode.py) gives greedy generate()'s tokens, token for token."""

from __future__ import annotations

import pytest
import torch

from binarize.decode import decode


def _generate(model, ids, n, eos=None):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos or 0)
    return out[:, ids.shape[1]:]


def _prompts(tok):
    texts = ["The quick brown fox jumps over the", "In the beginning of the year the company"]
    ids = [tok(t)["input_ids"] for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


@pytest.fixture(scope="module")
def fp_model(trained_tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(trained_tiny_dir))


@pytest.fixture(scope="module")
def packed_model(converted_tiny_dir):
    from binarize.formats.latent import load_converted
    from binarize.formats.packed_writer import pack_model_

    model, tok, _ = load_converted(converted_tiny_dir)
    with torch.no_grad():
        pack_model_(model, "binary", "fp32")
    return model.eval(), tok


@pytest.mark.parametrize("which", ["fp_model", "packed_model"])
def test_greedy_decode_equals_generate(which, request):
    model, tok = request.getfixturevalue(which)
    ids = _prompts(tok)
    want = _generate(model, ids, 24)
    got = decode(model, ids, 24)
    assert got.shape == want.shape and torch.equal(got, want)
    assert len(set(got[0].tolist())) > 2  # a trained model, not one repeated token: the test can fail


def test_decode_stops_at_the_end_token_like_generate(fp_model):
    model, tok = fp_model
    ids = _prompts(tok)[:1]
    free = decode(model, ids, 12)[0].tolist()
    eos = free[4]
    stop = free.index(eos)
    got = decode(model, ids, 12, eos_token_id=eos)
    assert got[0].tolist() == free[:stop + 1] == _generate(model, ids, 12, eos=eos)[0].tolist()


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(fp_model):
    model, tok = fp_model
    ids = _prompts(tok)
    a = decode(model, ids, 10, temperature=1.0, seed=3)
    b = decode(model, ids, 10, temperature=1.0, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, decode(model, ids, 10, temperature=1.0, seed=4))
    assert torch.equal(decode(model, ids, 10, temperature=1.0, top_p=1e-6, seed=3), decode(model, ids, 10))


def test_bad_arguments():
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        decode(None, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode(None, torch.zeros(1, 3, dtype=torch.long), 0)
