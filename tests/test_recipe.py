import pytest

from binarize.errors import BinarizeError
from binarize.recipe import Recipe, available_recipes, load_recipe, parse_set, parse_tokens


@pytest.mark.parametrize("text,expected", [("2B", 2_000_000_000), ("500M", 500_000_000), ("200k", 200_000),
                                           ("1.5M", 1_500_000), ("12000", 12_000), ("64K", 64_000)])
def test_parse_tokens(text, expected):
    assert parse_tokens(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "-2B", "abc", "1.5", "2X", "", "0k"])
def test_parse_tokens_rejects(text):
    with pytest.raises(BinarizeError):
        parse_tokens(text)


def test_shipped_recipes_load_and_default_is_the_paper():
    assert {"binaryllm", "binary-ste"} <= set(available_recipes())
    r = load_recipe("binaryllm")
    assert (r.quantizer, r.scheduler, r.chunks, r.scaling, r.bai_steps) == ("progressive", "exponential", 20, "dual", 50)
    assert (r.lr, r.min_lr, r.weight_decay, r.seq_len) == (1e-4, 2e-6, 0.1, 2048)
    assert load_recipe("binary-ste").quantizer == "ste"


def test_overrides_win_and_are_typed():
    r = load_recipe("binaryllm", {"seq_len": 512, **parse_set(["lr=3e-4", "scheduler=uniform", "bai=false"])})
    assert (r.seq_len, r.lr, r.scheduler, r.bai) == (512, 3e-4, "uniform", False)


@pytest.mark.parametrize("body,msg", [
    ("lr: 1e-4\nbogus_key: 3\n", "unknown recipe key 'bogus_key'"),
    ("chunks: twenty\n", "needs an int"),
    ("scheduler: cubic\n", "scheduler='cubic'"),
    ("lr: [1, 2\n", "malformed recipe"),
    ("- just\n- a list\n", "malformed recipe"),
    ("seq_len: 100\nbatch_tokens: 1000\n", "not a multiple"),
    ("chunks: 0\n", "chunks must be positive"),
])
def test_malformed_recipes(tmp_path, body, msg):
    path = tmp_path / "r.yaml"
    path.write_text(body)
    with pytest.raises(BinarizeError, match=msg.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(str(path))


def test_unknown_recipe_name_and_override_key():
    with pytest.raises(BinarizeError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(BinarizeError, match="unknown recipe key 'lrr'"):
        load_recipe("binaryllm", parse_set(["lrr=1"]))
    with pytest.raises(BinarizeError, match="key=value"):
        parse_set(["lr"])


def test_recipe_roundtrip_dict():
    r = load_recipe("binaryllm")
    assert Recipe(**r.to_dict()).validate() == r


def test_progressive_form_reaches_the_layers():
    import math

    import torch

    from binarize import quantizers
    from binarize.fake_quant import LayerSpec
    from binarize.qlinear import QuantLinear
    from binarize.recipe import PROGRESSIVE_FORMS

    assert PROGRESSIVE_FORMS == quantizers.PROGRESSIVE_FORMS
    with pytest.raises(BinarizeError, match="progressive_form=max is not defined with scaling=learnable"):
        load_recipe("binaryllm", {"progressive_form": "max", "scaling": "learnable"})
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    r = load_recipe("binaryllm", {"progressive_form": "max"})
    q = QuantLinear.from_linear(lin, spec=LayerSpec.from_recipe(r))
    q.fold_st()
    q.t = 2.0
    ones = torch.ones(8)
    for form in ("max", "paper"):
        ref = quantizers.binary_weight(q.weight, ones, torch.ones(16), 2.0, form=form)
        assert torch.equal(q.effective_weight(), ref) == (form == "max")
    q.t = math.inf  # the hard sign is the same for every form
    assert torch.equal(q.effective_weight(), quantizers.binary_weight(q.weight, ones, torch.ones(16), math.inf))
