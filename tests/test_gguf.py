"""GGUF export: exact blocks through gguf's dequantize, transformers and llama.cpp reading the file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from binarize.cli import main
from binarize.errors import BinarizeError
from binarize.formats.gguf_q1 import register_q1_0
from binarize.formats.gguf_writer import check_gguf_fit, folded_weights, permute_rotary, write_gguf
from binarize.qlinear import LayerSpec, quant_layers, quantize_, share_st_
from conftest import llama_cpp_logits

gguf = pytest.importorskip("gguf")
CASES = [("binary", "gguf-q1", "q4_0"), ("binary", "gguf-tq2", "q4_0"), ("ternary", "gguf-tq1", "q4_0"),
         ("ternary", "gguf-tq2", "q4_0"), ("ternary", "gguf-tq2", "q8_0")]
FP16_HALF_ULP = 2.0**-11  # relative rounding of an fp16 block scale


def _ok(argv) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code in (0, None)


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")


def test_q1_0_blocks_follow_llama_cpp():
    """Bit j of byte j // 8 set where x >= 0, d = mean |x| (quantize_row_q1_0_ref); a set bit reads +d."""
    register_q1_0()
    x = np.random.randn(3, 256).astype(np.float32)  # fresh every run
    stored = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q1_0)
    assert stored.shape == (3, 2 * 18)
    for row in range(3):
        for b in range(2):
            block, raw = x[row, b * 128:(b + 1) * 128], stored[row, b * 18:(b + 1) * 18]
            assert raw[:2].view(np.float16)[0] == np.float16(np.abs(block).astype(np.float64).mean())
            bits = [(raw[2 + j // 8] >> (j % 8)) & 1 for j in range(128)]
            assert bits == [int(v >= 0) for v in block]
    back = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType.Q1_0)
    d = np.repeat(stored.reshape(3, 2, 18)[:, :, :2].copy().view(np.float16).astype(np.float32), 128, axis=2)
    assert np.array_equal(back, np.where(x >= 0, 1, -1) * d.reshape(3, 256))


def test_exact_q4_0_holds_codes_times_the_row_scale():
    """Hand-packed Q4_0 (gguf's own quantizer would round +s to 7/8 of it) read by gguf's dequantize."""
    from binarize.formats.gguf_writer import exact_q4_0

    codes = torch.randint(-1, 2, (5, 96)).float()
    codes[2] = 0  # an all-zero row
    w = (codes * (torch.rand(5, 1) * 0.1 + 1e-3)).numpy()
    stored = exact_q4_0(w)
    assert stored.shape == (5, 3 * 18) and stored.dtype == np.uint8
    back = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType.Q4_0)
    scale = np.abs(w).max(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    assert np.array_equal(back, codes.numpy() * scale)
    with pytest.raises(BinarizeError, match="not sign/zero codes"):
        exact_q4_0(np.random.randn(2, 32).astype(np.float32))


def _random_converted(method: str, tokenizer_dir):
    """A converted-like model whose rows fit the blocks (256) except down_proj (640: the fallback for TQ),
    with random tied St folded in, so every fold has something to do."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, LayerSpec(method=method))
    share_st_(model)
    with torch.no_grad():
        for q in quant_layers(model).values():
            q.st.copy_(torch.rand_like(q.st) + 0.5)
        for q in quant_layers(model).values():
            q.fold_st()
    return model, tok


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def random_gguf(request, tokenizer_dir, tmp_path_factory):
    method, fmt, fallback = request.param
    model, tok = _random_converted(method, tokenizer_dir)
    path = tmp_path_factory.mktemp("gguf") / f"{fmt}.gguf"
    report = write_gguf(model, tok, {"method": method, "recipe": {"name": "test"}}, path, fmt, fallback=fallback,
                        tok_dir=tokenizer_dir)
    return model, tok, path, report, fmt, fallback


def test_blocks_dequantize_to_the_converted_weights(random_gguf):
    """gguf's own dequantize gives back every folded weight: codes exact, scale within fp16 rounding."""
    model, _, path, report, fmt, fallback = random_gguf
    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    linears, norms, _ = folded_weights(model)
    target = {"gguf-q1": "Q1_0", "gguf-tq1": "TQ1_0", "gguf-tq2": "TQ2_0"}[fmt]
    for name, want in linears.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        expect_type = target if want.shape[1] % (128 if fmt == "gguf-q1" else 256) == 0 else fallback.upper()
        assert t.tensor_type.name == expect_type, name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape).copy())
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.rsplit(".", 1)[1])
        if heads:  # undo llama.cpp's rotary row order
            order = permute_rotary(torch.arange(want.shape[0]), heads)
            got = got[torch.argsort(order)]
        assert torch.equal(torch.sign(got), torch.sign(want)), name  # every code, zeros included
        row = want.abs().amax(dim=1, keepdim=True)
        assert ((got - want).abs() <= FP16_HALF_ULP * row * 1.0001).all(), name
    for name, want in norms.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == "F32" and np.array_equal(t.data, want.numpy())
    fell = [n for n in linears if n.endswith("down_proj")] if fmt != "gguf-q1" else []
    assert report.fallback_tensors == fell
    assert report.fallback_weights == sum(linears[n].numel() for n in fell)
    assert 0 < report.max_scale_rel_error <= FP16_HALF_ULP * 1.0001


# transformers' GGUF loader dequantizes through the same gguf code the blocks test checks for every case,
# and the rest (hparams, norms, rotary order, tokenizer) does not depend on the type: two cases, one per
# code family (Q1_0 is registered by load_model, TQ1_0 ships with gguf), keep the suite's time down
READ_BACK = [CASES[0], CASES[2]]


@pytest.mark.parametrize("random_gguf", READ_BACK, indirect=True, ids=["-".join(c) for c in READ_BACK])
def test_transformers_reads_the_gguf_back(random_gguf):
    """The whole file (hparams, folded norms, rotary order, tokenizer) through transformers' GGUF loader."""
    from binarize.models import load_model

    model, tok, path = random_gguf[:3]
    gguf.quants._type_traits.pop(gguf.GGMLQuantizationType.Q1_0, None)  # as in a fresh process: load_model adds it
    loaded, loaded_tok, _ = load_model(str(path))
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        want, got = model(input_ids=x).logits, loaded(input_ids=x).logits
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # fp16 scales and embeddings only
    text = "Binary weights, 1.58 bits."
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]


def test_llama_cpp_runs_the_blocks(random_gguf):
    """llama.cpp's own TQ1_0/TQ2_0/Q1_0 kernels on the file: logits close to ours (it rounds
    activations to 8-bit blocks, which a random model's flat logits show as a few % of their range)."""
    model, tok, path = random_gguf[:3]
    ids = tok("The quick brown fox jumps over the lazy dog. Once upon a time")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    assert np.abs(got - want).max() <= 0.08 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_tokenizer_metadata_matches_the_source_gguf(tokenizer_dir, tmp_path):
    """Built from tokenizer.json, the vocabulary metadata equals what the default model's GGUF holds."""
    from transformers import AutoTokenizer

    from binarize.formats.gguf_tokenizer import add_hf_tokenizer_fields
    from binarize.models import default_model_file

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    add_hf_tokenizer_fields(writer, tok, Path(tokenizer_dir), len(tok))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = gguf.GGUFReader(str(tmp_path / "tok.gguf")).fields
    source = gguf.GGUFReader(str(default_model_file())).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key].contents() == source[key].contents(), key
    # transformers' GGUF tokenizer keeps a plain ByteLevel pre-tokenizer, which llama.cpp calls gpt-2
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"


# ----------------------------------------------------------------------------- real runs through the CLI


@pytest.fixture(scope="module")
def tied_run(trained_tiny_dir, small_text, tmp_path_factory):
    """binaryllm with share_st on the trained tiny LLaMA, whose down_proj (256 inputs) fits the
    blocks: BaI learns tied St that GGUF can fold."""
    from binarize.train import ConvertJob, convert
    from binarize.recipe import load_recipe

    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=3,
                                           calib_sequences=8, chunks=4, data=str(small_text), lr=1e-3,
                                           share_st=True))
    out = tmp_path_factory.mktemp("tied") / "run"
    return convert(ConvertJob(model=str(trained_tiny_dir), tokens=2048, out=out, recipe=recipe, progress=False))


@pytest.mark.parametrize("fmt", ["gguf-q1", "gguf-tq2"])
def test_cli_export_runs_in_llama_cpp_with_the_same_greedy_text(tied_run, tmp_path, capsys, fmt):
    """`binarize export RUN --format gguf-*`: llama.cpp continues a prompt greedily for 32 tokens exactly
    as binarize's runtime does, with close logits."""
    from binarize.formats.latent import load_converted

    out = tmp_path / "gguf"
    _ok(["export", str(tied_run), "--out", str(out), "--format", fmt])
    said = capsys.readouterr().out
    report = json.loads((out / "binarize_export.json").read_text())
    # hidden 64 fits no block: q/k/v/o/gate/up fall back to Q4_0; down_proj (256 inputs) fits
    assert report["fallback_weights"] == report["converted_weights"] - 2 * 64 * 256
    assert report["weights_by_type"][{"gguf-q1": "Q1_0", "gguf-tq2": "TQ2_0"}[fmt]] == 2 * 64 * 256
    assert "fell back" in said and (out / "model.gguf").stat().st_size == report["size_bytes"]

    llama_cpp = _llama_cpp()
    model, tok, _ = load_converted(tied_run)
    ids = tok("the company said it expects")["input_ids"]
    with torch.no_grad():
        want_logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        want = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got_logits = np.array(llm.scores[:len(ids)])
        got = []
        for _ in range(32):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
    finally:
        llm.close()
    assert got == want
    assert np.abs(got_logits - want_logits).max() <= 0.02 * np.abs(want_logits).max()


def test_single_file_output(tied_run, tmp_path, capsys):
    _ok(["export", str(tied_run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf-tq1", "--gguf-outer", "q8_0"])
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "TQ1_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _fails(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_untied_st_is_refused_and_nothing_is_left(converted_tiny_dir, tmp_path, capsys):
    """The default binaryllm recipe learns one St per layer: no GGUF, advice to use share_st."""
    for out in (tmp_path / "dir", tmp_path / "f.gguf"):
        assert "share_st" in _fails(capsys, ["export", str(converted_tiny_dir), "--out", str(out), "--format", "gguf-q1"])
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tied_run, tiny_model_dir, tmp_path, capsys):
    assert "not a binarize convert run" in _fails(capsys, ["export", str(tiny_model_dir), "--out",
                                                           str(tmp_path / "x.gguf"), "--format", "gguf-tq2"])
    assert "--gguf-outer" in _fails(capsys, ["export", str(tied_run), "--out", str(tmp_path / "x.gguf"),
                                            "--format", "gguf-tq2", "--gguf-outer", "q4_0"])
    assert "--gguf-fallback" in _fails(capsys, ["export", str(tied_run), "--out", str(tmp_path / "x.gguf"),
                                               "--format", "gguf-tq2", "--gguf-fallback", "f16"])
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tied_run, no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink(missing_ok=True)
    assert "tokenizer" in _fails(capsys, ["export", str(no_tok), "--out", str(tmp_path / "y.gguf"), "--format", "gguf-tq2"])
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_fit_checks(tiny_model):
    quantize_(tiny_model, LayerSpec(method="ternary"))
    with pytest.raises(BinarizeError, match="no zero code"):
        check_gguf_fit(tiny_model, {"method": "ternary"}, "gguf-q1")
    tiny_model.config.model_type = "mixtral"
    with pytest.raises(BinarizeError, match="does not map the 'mixtral' family"):
        check_gguf_fit(tiny_model, {"method": "ternary"}, "gguf-tq2")
