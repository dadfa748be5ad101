"""A GGUF given as MODEL keeps its rope scaling (transformers' GGUF reader drops it; issue 22)."""

import pytest
import torch

from binarize.errors import BinarizeError
from binarize.formats.gguf_rope import gguf_rope_parameters
from binarize.formats.gguf_writer import write_gguf
from binarize.qlinear import LayerSpec, quant_layers, quantize_, share_st_

gguf = pytest.importorskip("gguf")

# plain rope through load_model is tests/test_gguf.py's read-back test
ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    # original context 64 at max_position 256, so the smoothed band holds several of the 32 frequencies
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def _converted_llama(tokenizer_dir, rope: dict):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    params = {"rope_theta": 10000.0, **rope}
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      rope_parameters=params)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, LayerSpec(method="binary"))
    share_st_(model)
    for q in quant_layers(model).values():
        q.fold_st()
    return model, tok


@pytest.mark.parametrize("kind", list(ROPES))
def test_gguf_input_keeps_rope_scaling(kind, tokenizer_dir, tmp_path):
    """Logits of the GGUF loaded back as MODEL match the model written, for each rope type; the same
    file read with plain rope (what transformers alone gives) does not, so the check can fail."""
    from binarize.models import load_model

    model, tok = _converted_llama(tokenizer_dir, ROPES[kind])
    path = tmp_path / f"{kind}.gguf"
    write_gguf(model, tok, {"method": "binary", "recipe": {"name": "test"}}, path, "gguf-q1", tok_dir=tokenizer_dir)
    loaded, _, _ = load_model(str(path))
    assert loaded.config.rope_parameters["rope_type"] == kind
    x = torch.randint(0, len(tok), (1, 200))
    with torch.no_grad():
        want, got = model(input_ids=x).logits, loaded(input_ids=x).logits
    err = (got - want).abs().max() / want.abs().max()
    assert err <= 2e-2, err  # fp16 scales and embeddings only
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert plain.config.rope_parameters["rope_type"] == "default"  # the reader's loss this module restores
    with torch.no_grad():
        dropped = plain(input_ids=x).logits
    assert (dropped - want).abs().max() / want.abs().max() > 5 * err


def _gguf_with(path, **kv):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_rope_freq_base(10000.0)
    for key, value in kv.items():
        w.add_string(key, value) if isinstance(value, str) else w.add_float32(key, value)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unrestorable_rope_scaling_is_refused(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2)
    path = _gguf_with(tmp_path / "yarn.gguf", **{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(BinarizeError, match="rope scaling 'yarn'"):
        gguf_rope_parameters(path, cfg)
    plain = _gguf_with(tmp_path / "plain.gguf")
    assert gguf_rope_parameters(plain, cfg) is None
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + bytes(20))
    with pytest.raises(BinarizeError, match="not a GGUF file"):
        gguf_rope_parameters(tmp_path / "bad.gguf", cfg)
