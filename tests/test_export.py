"""Packed export: exact round trips, exact reload, transformers integration, damaged files."""

import json
import shutil

import pytest
import torch

from binarize.cli import main
from binarize.formats.latent import load_converted
from binarize.errors import BinarizeError
from binarize.formats import export
from binarize.formats.packed_reader import load_packed, resident_bytes
from binarize.packed import PackedLinear
from binarize.packing import FORMATS, pack, packed_shape, unpack
from binarize.quantizers import dequantize


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (16, 64), (33, 100), (96, 40)])
def test_pack_unpack_is_exact(fmt, shape):
    values = torch.tensor([-1, 1] if fmt == "binary" else [-1, 0, 1], dtype=torch.int8)
    codes = values[torch.randint(len(values), shape)]  # fresh random codes every run
    packed = pack(codes, fmt)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_shape(fmt, *shape)
    assert torch.equal(unpack(packed, fmt, *shape), codes)


def test_ternary2_is_transformers_bitnet_layout():
    from transformers.integrations.bitnet import pack_weights

    for out in (8, 10, 13):
        codes = torch.tensor([-1, 0, 1], dtype=torch.int8)[torch.randint(3, (out, 24))]
        assert torch.equal(pack(codes, "ternary2"), pack_weights(codes.float().clone()).to(torch.uint8))


def test_pack_rejects_codes_outside_the_format():
    with pytest.raises(BinarizeError):
        pack(torch.zeros(4, 8, dtype=torch.int8), "binary")  # 0 has no binary code
    with pytest.raises(BinarizeError):
        pack(torch.full((4, 5), 2, dtype=torch.int8), "ternary-b3")


def test_bits_per_weight_on_real_shapes():
    # SmolLM2-135M shapes: 1 bit of codes per weight for binary, 2 for ternary2, 1.6 for ternary-b3
    # (576 = 5 * 115.2: the last base-3 byte of a row is part padding)
    o, i = 1536, 576
    got = {fmt: torch.Size(packed_shape(fmt, o, i)).numel() * 8 / (o * i) for fmt in FORMATS}
    assert got["binary"] == 1.0 and got["ternary2"] == 2.0
    assert got["ternary-b3"] == 116 * 8 / 576


@pytest.fixture(scope="module")
def exported(converted_tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")  # fp32 outer tensors: the logits match the converted model's
    return {fmt: export(converted_tiny_dir, root / fmt, fmt, outer_dtype="fp32") for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_matches_converted_logits(exported, converted_tiny_dir, fmt):
    ref, tok, _ = load_converted(converted_tiny_dir)
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        want = ref(input_ids=x).logits
    for cache in ("none", "fp32"):
        model, _, meta = load_packed(exported[fmt], cache)
        layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
        assert len(layers) == 14 and all(m.qweight.dtype == torch.uint8 for m in layers)
        with torch.no_grad():
            got = model(input_ids=x).logits
        assert (got - want).abs().max() < 1e-4
    # every packed layer dequantizes to its converted layer's hard-sign weight bit for bit
    from binarize.qlinear import quant_layers

    for name, q in quant_layers(ref).items():
        p = model.get_submodule(name)
        assert torch.equal(p.dequantized(), q.effective_weight().detach())
        assert torch.equal(dequantize(p.codes(), p.scale, p.st), p.dequantized())


def test_plain_transformers_loads_the_export(exported):
    import binarize  # noqa: F401  (registers quant_method "binarize")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported["binary"])
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
    assert json.loads((exported["binary"] / "config.json").read_text())["quantization_config"]["format"] == "binary"


def test_packed_model_is_smaller_in_memory(exported, converted_tiny_dir):
    packed, _, _ = load_packed(exported["binary"], "none")
    ref, _, _ = load_converted(converted_tiny_dir)
    linear_bytes = sum(m.qweight.numel() for m in packed.modules() if isinstance(m, PackedLinear))
    assert linear_bytes * 8 == sum(q.weight.numel() for q in ref.modules() if hasattr(q, "sl"))
    assert resident_bytes(packed) < sum(p.numel() * 4 for p in ref.parameters())


@pytest.mark.parametrize("outer", ["bf16", "fp16"])
def test_outer_tensors_are_stored_in_half_precision(exported, converted_tiny_dir, tmp_path, outer):
    """The default export stores embeddings / lm_head in bf16 (norms fp32), loads them back as the
    rounded fp32 values and computes in fp32; the packed layers are untouched."""
    from safetensors import safe_open

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[outer]
    out = export(converted_tiny_dir, tmp_path / outer, "binary", **({} if outer == "bf16" else {"outer_dtype": outer}))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == {"bf16": "BF16", "fp16": "F16"}[outer]
    assert dtypes["model.norm.weight"] == "F32" and dtypes["model.layers.0.input_layernorm.weight"] == "F32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "binarize.json").read_text())["outer_dtype"] == outer
    full = exported["binary"] / "model.safetensors"
    assert (out / "model.safetensors").stat().st_size < 0.75 * full.stat().st_size
    ref, tok, _ = load_converted(converted_tiny_dir)
    model, _, _ = load_packed(out)
    emb = model.model.embed_tokens.weight
    assert emb.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    assert torch.equal(emb, ref.model.embed_tokens.weight.detach().to(half).float())
    assert not torch.equal(emb, ref.model.embed_tokens.weight.detach())  # it was rounded
    assert torch.equal(model.model.norm.weight, load_packed(exported["binary"])[0].model.norm.weight)
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        want, got = ref(input_ids=x).logits, model(input_ids=x).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_int8_outer_tensors_are_rows_of_codes_and_scales(exported, converted_tiny_dir, tmp_path):
    """--outer-dtype int8 stores the (tied) embedding once as int8 codes plus a row scale, a quarter of
    fp32's bytes, and loads back as codes * scale: within half a step of every row's absmax."""
    from safetensors import safe_open

    out = export(converted_tiny_dir, tmp_path / "int8", "binary", outer_dtype="int8")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "model.embed_tokens.weight" not in dtypes and "lm_head.weight" not in dtypes
    assert dtypes["model.embed_tokens.weight_int8"] == "I8" and dtypes["model.embed_tokens.weight_int8_scale"] == "F32"
    meta = json.loads((out / "binarize.json").read_text())
    assert meta["outer_dtype"] == "int8" and "model.embed_tokens.weight" in meta["outer_int8"]
    ref, tok, _ = load_converted(converted_tiny_dir)
    model, _, _ = load_packed(out)
    want_emb = ref.model.embed_tokens.weight.detach()
    emb = model.model.embed_tokens.weight
    step = want_emb.abs().amax(dim=1, keepdim=True) / 127
    assert emb.dtype == torch.float32 and ((emb - want_emb).abs() <= step / 2 * 1.0001).all()
    assert not torch.equal(emb, want_emb)  # it was rounded
    assert model.lm_head.weight is emb or torch.equal(model.lm_head.weight, emb)
    full = exported["binary"] / "model.safetensors"
    assert (out / "model.safetensors").stat().st_size < 0.4 * full.stat().st_size
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        want, got = ref(input_ids=x).logits, model(input_ids=x).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(BinarizeError, match="must be one of bf16, fp16, fp32, got 'int8'"):
        export(converted_tiny_dir, tmp_path / "bitnet", "bitnet", outer_dtype="int8")


def test_outer_dtype_is_checked_before_any_work(converted_tiny_dir, tmp_path):
    with pytest.raises(BinarizeError, match="--outer-dtype must be one of bf16, fp16, fp32, int8"):
        export(converted_tiny_dir, tmp_path / "x", "binary", outer_dtype="int4")
    with pytest.raises(BinarizeError, match="takes no option --outer-dtype"):
        export(converted_tiny_dir, tmp_path / "y", "gguf-tq2", outer_dtype="bf16")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_damaged_exports_give_one_clear_error(exported, tmp_path):
    d = _copy(exported["binary"], tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BinarizeError, match="checksum mismatch"):
        load_packed(d)

    d = _copy(exported["binary"], tmp_path / "version")
    meta = json.loads((d / "binarize.json").read_text())
    meta["format_version"] = 99
    (d / "binarize.json").write_text(json.dumps(meta))
    with pytest.raises(BinarizeError, match="format version 99"):
        load_packed(d)

    d = _copy(exported["binary"], tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the packed tensors no longer fit the config
    (d / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((d / "binarize.json").read_text())
    meta.pop("file_checksums", None)  # as an export written before config.json had a checksum
    (d / "binarize.json").write_text(json.dumps(meta))
    with pytest.raises(BinarizeError, match="has shape"):
        load_packed(d)

    d = _copy(exported["binary"], tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    with pytest.raises(BinarizeError, match="no tokenizer"):
        load_packed(d)


def test_export_cli_errors(capsys, exported, converted_tiny_dir, tmp_path):
    def run(*argv):
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
        return exc.value.code, capsys.readouterr().err.strip().splitlines()

    code, err = run("export", str(exported["binary"]), "--out", str(tmp_path / "x"))
    assert code == 2 and len(err) == 1 and "not a binarize convert run directory" in err[0]
    code, err = run("export", str(converted_tiny_dir), "--out", str(tmp_path / "y"), "--format", "nibble")
    assert code == 2 and len(err) == 1 and "unknown packed format 'nibble'" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_chat_one_shot_on_packed_and_fp_models(capsys, exported, trained_tiny_dir):
    from binarize.chat import ChatSession

    outs = []
    for spec in (exported["binary"], exported["binary"], trained_tiny_dir):
        session = ChatSession.load(str(spec), max_new_tokens=6)
        session.reply("Hello there")
        assert session.history[0] == {"role": "user", "content": "Hello there"}
        assert session.history[1]["role"] == "assistant"
        assert session._inputs().shape[1] > 6  # the chat template wrapped both turns
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # greedy by default: the same reply twice
    with pytest.raises(SystemExit) as exc:
        main(["chat", str(exported["binary"]), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert exc.value.code in (0, None)


def test_files_honour_the_umask(exported, converted_tiny_dir):
    """Weights are as readable as the rest of a run or export (safetensors alone writes 0600)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    dirs = [converted_tiny_dir, *exported.values()]
    files = [p for d in dirs for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes

