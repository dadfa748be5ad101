"""Every supported family converts, exports packed and loads back with the converted model's logits
(tiny random configs built here, the real SmolLM2 tokenizer), MoE experts included (one linear per
expert, ``binarize.experts``); expert layouts binarize does not know are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from binarize.errors import BinarizeError
from binarize.formats.outer import cast_outer_
from binarize.models import SUPPORTED_MODEL_TYPES, decoder_layers, target_linears

FAMILIES = {  # model_type -> config fields beside the shared tiny shape
    "qwen2": {},
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),  # soft-capped logits, sliding window, (1 + w) norms
    "gemma3_text": dict(head_dim=16),  # q/k norms
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "gpt_neox": {},  # fused query_key_value with biases, LayerNorm with bias, parallel residual
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # stacked 3-D experts, FP router
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,  # + shared expert and its gate
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def make_family(model_type: str, tokenizer_dir, out, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **{**TINY, **FAMILIES.get(model_type, {}), **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_converts_exports_and_loads_back(family, tokenizer_dir, small_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from binarize.formats.latent import load_converted
    from binarize.formats.packed_reader import load_packed
    from binarize.packed import PackedLinear
    from binarize.qlinear import QuantLinear, quant_layers
    from binarize.recipe import load_recipe
    from binarize.train import ConvertJob, convert_run

    assert family in SUPPORTED_MODEL_TYPES
    src = make_family(family, tokenizer_dir, tmp_path / "src")
    recipe = load_recipe("binaryllm", dict(seq_len=32, batch_tokens=64, bai_batch_tokens=64, bai_steps=1,
                                           calib_sequences=4, chunks=2, data=str(small_text), lr=1e-3,
                                           share_st=family in MOE))  # MoE: q/k/v's St folds, the experts' stays
    result = convert_run(ConvertJob(model=str(src), tokens=256, out=tmp_path / "run", recipe=recipe, progress=False,
                                    export="binary"))
    ref, tok, _ = load_converted(result.path)
    layers = quant_layers(ref)
    assert len(layers) == result.record.quantized_layers > 0
    left = [n for n, m in decoder_layers(ref).named_modules() if isinstance(m, torch.nn.Linear)]
    assert left == ([f"{i}.mlp.shared_expert_gate" for i in range(2)] if family == "qwen2_moe" else [])  # FP gates only
    if family in MOE:  # every expert of every block converted, the router's weight untouched
        experts = FAMILIES[family].get("num_local_experts", FAMILIES[family].get("num_experts"))
        assert sum(".experts." in n for n in quant_layers(ref)) == 2 * 2 * experts
        fp = AutoModelForCausalLM.from_pretrained(src)
        assert torch.equal(decoder_layers(ref)[0].mlp.gate.weight, decoder_layers(fp)[0].mlp.gate.weight)
    x = torch.randint(0, len(tok), (2, 20))
    cast_outer_(ref, "bf16", skip=(QuantLinear,))  # the export stores embeddings / lm_head in bf16
    ref.float()
    with torch.no_grad():
        want = ref(input_ids=x).logits
    model, _, _ = load_packed(result.exported.path, "fp32")
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == len(layers)
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert torch.isfinite(want).all()
    assert float((got - want).abs().max()) < 1e-4


def test_gemma2_chunked_loss_matches_its_softcapped_logits(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from binarize.train.losses import Distill, TrainLoss

    model = AutoModelForCausalLM.from_pretrained(make_family("gemma2", tokenizer_dir, tmp_path / "g",
                                                             final_logit_softcapping=0.5), dtype=torch.float32)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, model.config.vocab_size, (2, 17))
    results = []
    for chunk in (0, 5):
        model.zero_grad(set_to_none=True)
        loss, ce, kd = TrainLoss(model, Distill(teacher, 1.0, 1.0), chunk)(x)
        loss.backward()
        results.append((float(loss), float(kd), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, k0, g0), (l1, k1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5) and k1 == pytest.approx(k0, rel=1e-4)
    for name, g in g0.items():
        assert float((g1[name] - g).abs().max()) <= 1e-4 * float(g.abs().max()) + 1e-9, name


def test_experts_of_an_unknown_layout_are_refused():
    """GPT-OSS keeps interleaved, biased experts: not unstacked, so target_linears refuses them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from binarize.experts import unstack_experts_

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    model = AutoModelForCausalLM.from_config(cfg)
    assert unstack_experts_(model) == 0
    with pytest.raises(BinarizeError, match="stacked 3-D tensors .*experts.* layout binarize does not convert"):
        target_linears(model)


@pytest.mark.parametrize("export, says", [("bitnet", "--export bitnet: transformers' BitNet format reads mixtral"),
                                          ("gguf-q1", "GGUF writer does not map the 'mixtral' family")])
def test_moe_export_to_a_format_without_experts_is_refused_before_training(export, says, tokenizer_dir, small_text,
                                                                           tmp_path):
    from binarize.recipe import load_recipe
    from binarize.train import ConvertJob, convert_run

    src = make_family("mixtral", tokenizer_dir, tmp_path / "src", **FAMILIES["mixtral"])
    name = "bitnet-b158-absmean" if export == "bitnet" else "binaryllm"
    extra = {} if export == "bitnet" else {"share_st": True}
    recipe = load_recipe(name, dict(seq_len=32, batch_tokens=64, chunks=2, data=str(small_text), **extra))
    with pytest.raises(BinarizeError, match=says):
        convert_run(ConvertJob(model=str(src), tokens=256, out=tmp_path / "run", recipe=recipe, progress=False,
                               export=export))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_bitnet_export_of_a_converted_moe_run_is_refused(tokenizer_dir, tmp_path):
    """``binarize export --format bitnet`` checks the loaded run too, not only convert's --export."""
    from transformers import AutoModelForCausalLM

    from binarize.formats.bitnet import check_bitnet_fit
    from binarize.qlinear import LayerSpec, quantize_

    model = AutoModelForCausalLM.from_pretrained(make_family("mixtral", tokenizer_dir, tmp_path / "m",
                                                             **FAMILIES["mixtral"]))
    quantize_(model, LayerSpec(method="ternary", act_bits=8))
    with pytest.raises(BinarizeError, match="BitNet format reads mixtral's experts as stacked tensors"):
        check_bitnet_fit(model, {"method": "ternary", "act_bits": 8})
