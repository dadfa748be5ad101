"""One precision rule for every writer (issue 42): a full-precision tensor whose values its storage
type cannot hold (non-finite, or past fp16's 65504) is refused with one line naming it, by the one
function ``formats.outer.check_fits`` that the packed, BitNet and GGUF writers all call."""

import shutil

import pytest
import torch

from binarize.errors import BinarizeError
from binarize.formats.outer import cast_outer_, check_fits
from tests.test_cli_errors import assert_one_line_error, run_cli


def test_check_fits_limits_per_storage_type():
    big = torch.tensor([[1.0, -7e4]])
    for storage in ("bf16", "fp32", "f32", "int8", "q8_0"):
        check_fits("w", big, storage)  # 7e4 fits everything but half precision
    for storage in ("fp16", "f16"):
        with pytest.raises(BinarizeError, match=r"^w holds values up to 7e\+04, beyond what f?p?16 stores"):
            check_fits("w", big, storage)
    check_fits("w", torch.tensor([65504.0]), "f16")  # the largest fp16 itself fits
    with pytest.raises(BinarizeError, match="beyond what f16 stores"):
        check_fits("w", torch.tensor([65520.0]), "f16")  # rounds to inf in fp16
    with pytest.raises(BinarizeError, match="beyond what q8_0 stores"):
        check_fits("w", torch.tensor([1e7]), "q8_0")  # its fp16 block scale 1e7 / 127 overflows
    with pytest.raises(BinarizeError, match="beyond what bf16 stores"):
        check_fits("w", torch.tensor([3.4e38]), "bf16")
    for storage in ("fp32", "bf16", "int8", "q8_0", "f16"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(BinarizeError, match=r"^w holds 1 non-finite value\(s\)"):
                check_fits("w", torch.tensor([[0.5, bad]]), storage)


def test_cast_outer_checks_every_matrix_before_casting_any():
    """The packed and BitNet writers' cast: refused with the tensor's full name, nothing cast."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e5
    with pytest.raises(BinarizeError, match=r"^1.weight holds values up to 1e\+05, beyond what fp16 stores .*"
                                            r"use --outer-dtype bf16"):
        cast_outer_(model, "fp16")
    assert model[0].weight.dtype == torch.float32
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    for dtype in ("bf16", "fp32", "int8"):  # a NaN fits no storage type: no silent export
        with pytest.raises(BinarizeError, match="1.weight holds 1 non-finite"):
            cast_outer_(model, dtype)


def _poisoned_run(converted_tiny_dir, out, value):
    """A copy of the converted run whose embedding (tied lm_head) holds ``value`` once."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(converted_tiny_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    key = "model.embed_tokens.weight" if "model.embed_tokens.weight" in tensors else "lm_head.weight"  # tied
    tensors[key][7, 3] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("value,outer,needle", [
    (float("nan"), "bf16", "model.embed_tokens.weight holds 1 non-finite value(s)"),
    (1e5, "fp16", "model.embed_tokens.weight holds values up to 1e+05, beyond what fp16 stores"),
])
def test_packed_export_refuses_what_the_outer_dtype_cannot_hold(capsys, converted_tiny_dir, tmp_path, value, outer,
                                                                needle):
    run = _poisoned_run(converted_tiny_dir, tmp_path / "run", value)
    out = tmp_path / "packed"
    code, err = run_cli(capsys, "export", str(run), "--out", str(out), "--outer-dtype", outer)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_bitnet_writer_refuses_through_the_same_rule(tiny_model, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from binarize.fake_quant import LayerSpec
    from binarize.formats.bitnet import export_bitnet
    from binarize.qlinear import quantize_

    quantize_(tiny_model, LayerSpec(method="ternary", act_bits=8))
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight[0, 0] = 7e4
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(BinarizeError, match="model.embed_tokens.weight holds values up to 7e\\+04, beyond what fp16"):
        export_bitnet(tiny_model, tok, {"method": "ternary", "act_bits": 8}, tmp_path, outer_dtype="fp16")
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("value,needle", [
    (7e4, "model.embed_tokens.weight holds values up to 7e+04, beyond what f16 stores (largest 6.55e+04): "
          "use --gguf-outer q8_0"),
    (float("inf"), "model.embed_tokens.weight holds 1 non-finite value(s)"),
])
def test_gguf_writer_refuses_an_outer_tensor_f16_cannot_hold(tokenizer_dir, tmp_path, value, needle):
    """The GGUF writer used to cast anyway (a numpy RuntimeWarning) and llama.cpp then gave
    non-finite logits at every position; q8_0 holds 7e4 (its block scale is 7e4 / 127)."""
    pytest.importorskip("gguf")
    from binarize.formats.gguf_writer import write_gguf
    from tests.test_gguf import _random_converted

    model, tok = _random_converted("binary", tokenizer_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 1] = value
    meta = {"method": "binary", "recipe": {"name": "test"}}
    with pytest.raises(BinarizeError) as exc:
        write_gguf(model, tok, meta, tmp_path / "m.gguf", "gguf-q1", tok_dir=tokenizer_dir)
    assert str(exc.value) == needle if value == 7e4 else str(exc.value).startswith(needle)
    assert not (tmp_path / "m.gguf").exists()
    if value == 7e4:
        write_gguf(model, tok, meta, tmp_path / "q8.gguf", "gguf-q1", outer="q8_0", tok_dir=tokenizer_dir)
        assert (tmp_path / "q8.gguf").stat().st_size > 0
