"""Model metadata carried whole (issue 42): every field of the source's generation_config.json is
equal after convert -> export -> load, for each export format that can hold it; GGUF holds the
first EOS id, the pad / bos ids and llama.cpp's sampling defaults, and its export notes name the
fields it cannot hold."""

import shutil

import numpy as np
import pytest

GEN = dict(eos_token_id=[2, 0], pad_token_id=1, bos_token_id=1, do_sample=True, temperature=0.7, top_p=0.9,
           top_k=40, repetition_penalty=1.1)
FORMATS = [("binary", "binary"), ("binary", "gguf-q1"), ("ternary", "ternary2"), ("ternary", "ternary-b3"),
           ("ternary", "bitnet"), ("ternary", "gguf-tq2")]
GGUF_KEYS = {"eos_token_id": "tokenizer.ggml.eos_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id",
             "bos_token_id": "tokenizer.ggml.bos_token_id", "temperature": "general.sampling.temp",
             "top_p": "general.sampling.top_p", "top_k": "general.sampling.top_k",
             "repetition_penalty": "general.sampling.penalty_repeat"}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, small_text, tmp_path_factory):
    """A source whose generation_config sets every field of GEN, converted once to 1 bit (BaI with
    tied St, so GGUF Q1 can hold it) and once to 1.58 bits (bitnet-b158: every ternary format)."""
    from transformers import GenerationConfig

    from binarize.recipe import load_recipe
    from binarize.train import ConvertJob, convert

    root = tmp_path_factory.mktemp("generation")
    src = root / "source"
    shutil.copytree(tiny_model_dir, src)
    GenerationConfig(**GEN).save_pretrained(src)
    base = dict(seq_len=64, batch_tokens=256, chunks=4, data=str(small_text))
    binary = load_recipe("binaryllm", dict(base, bai_batch_tokens=128, bai_steps=2, calib_sequences=4, share_st=True))
    ternary = load_recipe("bitnet-b158-absmean", dict(base, micro_batch=4))
    return {name: convert(ConvertJob(model=str(src), tokens=512, out=root / name, recipe=rec, progress=False))
            for name, rec in (("binary", binary), ("ternary", ternary))}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each format exported once (on first use): {format: (path, export lines)}."""
    from binarize.formats import export_run

    root, done = tmp_path_factory.mktemp("gen-exports"), {}

    def get(method: str, fmt: str):
        if fmt not in done:
            out = export_run(runs[method], root / fmt, fmt)
            done[fmt] = (out.path, out.lines)
        return done[fmt]

    return get


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_the_run_directory_holds_the_whole_generation_config(runs, method):
    from binarize.formats.latent import load_converted

    gen = load_converted(runs[method])[0].generation_config
    assert {k: getattr(gen, k) for k in GEN} == GEN


@pytest.mark.parametrize("field", list(GEN))
@pytest.mark.parametrize("method,fmt", FORMATS, ids=[f for _, f in FORMATS])
def test_each_field_round_trips_through_each_format(exports, method, fmt, field):
    path, lines = exports(method, fmt)
    if not fmt.startswith("gguf"):  # packed and BitNet hold generation_config.json whole
        from binarize.loading import load_any

        model, _, _ = load_any(str(path))
        assert getattr(model.generation_config, field) == GEN[field]
        return
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    notes = " ".join(lines)
    if field == "do_sample":  # no GGUF key: the export says so
        assert "generation_config fields GGUF cannot hold: do_sample=True" in notes
    elif field == "eos_token_id":  # one EOS id: the first, and a note for the others
        assert fields[GGUF_KEYS[field]].contents() == GEN[field][0]
        assert "eos_token_id [2, 0]: GGUF holds one EOS id, 2 is kept (0 not held)" in notes
    else:
        assert fields[GGUF_KEYS[field]].contents() == pytest.approx(GEN[field], rel=1e-6)


def test_llama_cpp_reads_the_gguf_with_its_sampling_defaults(exports):
    from conftest import llama_cpp_logits

    path, _ = exports("ternary", "gguf-tq2")
    assert np.isfinite(llama_cpp_logits(path, [1, 5, 9, 13])).all()


def test_gguf_generation_maps_and_names_what_it_cannot_hold():
    from transformers import GenerationConfig

    from binarize.formats.generation import gguf_generation

    special, sampling, notes = gguf_generation(GenerationConfig(**GEN, num_beams=2))
    assert special == {"eos": 2, "pad": 1, "bos": 1}
    assert sampling == pytest.approx({"general.sampling.temp": 0.7, "general.sampling.top_p": 0.9,
                                      "general.sampling.top_k": 40, "general.sampling.penalty_repeat": 1.1})
    assert notes[-1] == "generation_config fields GGUF cannot hold: do_sample=True, num_beams=2"
    assert gguf_generation(None) == ({}, {}, [])
