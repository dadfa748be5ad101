"""GGUF export of every mapped family runs in upstream llama.cpp with binarize's own logits (tiny
random models; St tied and random, norms and biases random, so every fold has something to do)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binarize.families import family_of
from binarize.formats.gguf_arch import ARCHS
from binarize.formats.gguf_writer import folded_weights, write_gguf
from binarize.qlinear import LayerSpec, quant_layers, quantize_, share_st_
from conftest import llama_cpp_logits

gguf = pytest.importorskip("gguf")
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
FAMILY_CONFIG = {
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),  # q/k/v biases
    "qwen3": dict(num_key_value_heads=2, head_dim=32),  # per-head q/k norms
    "gemma": dict(num_key_value_heads=2, head_dim=32),  # (1 + w) norms, scaled embeddings, GeGLU
    # + post-attention / pre- and post-feed-forward norms, attention and final soft-capping (caps low enough
    # to bite), a window shorter than the prompt on the sliding layer (layer 0 slides, layer 1 attends to all)
    "gemma2": dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, sliding_window=6),
    # + per-head q/k norms, a rotary base of its own on sliding layers; layer_types as the model says
    "gemma3_text": dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(num_key_value_heads=2),  # fused qkv_proj / gate_up_proj
    "gpt_neox": dict(rotary_pct=0.5),  # fused per-head qkv with biases, LayerNorm with bias, parallel residual
}


def converted_family(model_type: str, tokenizer_dir, method: str = "binary"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **SHAPE, **FAMILY_CONFIG[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    quantize_(model, LayerSpec(method=method))
    share_st_(model)
    family, layers = family_of(cfg), quant_layers(model)
    with torch.no_grad():
        for name, q in layers.items():
            if family.up_linear is not None or not name.endswith(family.down_proj):
                q.st.copy_(torch.rand_like(q.st) + 0.5)
            if q.bias is not None:
                q.bias.copy_(0.1 * torch.randn_like(q.bias))
        for q in layers.values():
            q.fold_st()
        for name, p in model.named_parameters():  # norms (weights and biases) away from their init
            if p.dim() == 1 and not any(name.startswith(n + ".") for n in layers):
                p.add_(0.2 * torch.randn_like(p))
        off = family.norm_offset
        for block in model.base_model.layers:  # sharper attention, so that the rotary layout shows in the logits
            w = block.get_submodule(family.norm_groups[0][0]).weight
            w.copy_(4 * (off + w) - off)
    return model, tok


def test_every_mapped_family_has_a_config_here():
    from binarize.families import FAMILIES
    from binarize.models import SUPPORTED_MODEL_TYPES

    assert set(FAMILY_CONFIG) | {"llama"} == set(ARCHS)  # llama: tests/test_gguf.py
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)  # every supported family says where its St folds


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIG))
def test_llama_cpp_runs_the_family_with_our_logits(model_type, tokenizer_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    model, tok = converted_family(model_type, tokenizer_dir)
    path = tmp_path / f"{model_type}.gguf"
    report = write_gguf(model, tok, {"method": "binary", "recipe": {"name": "test"}}, path, "gguf-q1",
                        tok_dir=tokenizer_dir)
    assert report.fallback_weights == 0 and report.weights_by_type == {"Q1_0": report.converted_weights}
    ids = tok("The quick brown fox jumps over the lazy dog. Once upon a time there was")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    got = llama_cpp_logits(path, ids)
    spread = want.max(-1, keepdims=True) - want.min(-1, keepdims=True)
    err = np.abs((got - got.mean(-1, keepdims=True)) - (want - want.mean(-1, keepdims=True))) / spread
    assert err.max() <= 0.08, f"{model_type}: llama.cpp's logits differ by {err.max():.3f} of their range"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_folding_is_exact_in_full_precision(tokenizer_dir):
    """The folded linears, norms and biases put back into plain modules give the converted logits."""
    model, tok = converted_family("phi3", tokenizer_dir)
    x = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        want = model(input_ids=x).logits
        linears, norms, biases = folded_weights(model)
        for name, q in quant_layers(model).items():
            plain = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            plain.weight.copy_(linears[name])
            if q.bias is not None:
                plain.bias.copy_(biases[name + ".bias"])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
        for name, w in norms.items():
            model.get_submodule(name).weight.copy_(w - family_of(model.config).norm_offset)
        got = model(input_ids=x).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_neox_down_st_that_cannot_fold_is_refused(tokenizer_dir, tmp_path):
    from binarize.errors import BinarizeError

    model, tok = converted_family("gpt_neox", tokenizer_dir)
    q = quant_layers(model)["gpt_neox.layers.0.mlp.dense_4h_to_h"]
    with torch.no_grad():
        q.st.fill_(2.0)
    with pytest.raises(BinarizeError, match="cannot fold through the gpt_neox MLP's activation"):
        write_gguf(model, tok, {"method": "binary"}, tmp_path / "x.gguf", "gguf-q1", tok_dir=tokenizer_dir)


@pytest.mark.parametrize("model_type", ["gemma", "phi3", "gpt_neox"])
def test_packed_export_folds_tied_st_into_each_familys_norms(model_type, tokenizer_dir):
    """The packed writer folds a shared St into the norm in front (Gemma: (1 + w) * St - 1; a
    LayerNorm's bias too) and keeps the converted logits."""
    from binarize.formats.packed_writer import pack_model_

    model, tok = converted_family(model_type, tokenizer_dir)
    x = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        want = model(input_ids=x).logits
        pack_model_(model, "binary", "fp32")
        got = model(input_ids=x).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("model_type, extra, says", [
    ("gemma2", dict(query_pre_attn_scalar=64), r"scales queries by 1/sqrt\(32\) .* query_pre_attn_scalar is 64"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "gemma3 has no attention logit soft-capping"),
    ("gemma3_text", dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
     "no rope scaling on sliding-window layers"),
])
def test_gemma_settings_llama_cpp_does_not_read_are_refused(model_type, extra, says):
    from transformers import AutoConfig

    from binarize.errors import BinarizeError
    from binarize.formats.gguf_arch import arch_of

    cfg = AutoConfig.for_model(model_type, **SHAPE, **{**FAMILY_CONFIG[model_type], **extra})
    with pytest.raises(BinarizeError, match=says):
        arch_of(cfg)
