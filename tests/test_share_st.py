"""Recipe option share_st: St tied so that it can be folded into neighbouring weights."""

import torch

from binarize.qlinear import quant_layers, quantize_, share_st_, unswap_


def test_tying_structure(tiny_model):
    quantize_(tiny_model)
    share_st_(tiny_model)
    block = tiny_model.model.layers[0]
    a, m = block.self_attn, block.mlp
    assert a.q_proj.st is a.k_proj.st is a.v_proj.st and m.gate_proj.st is m.up_proj.st
    assert m.down_proj.st is not m.up_proj.st
    cfg = tiny_model.config
    hd, g = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    assert a.o_proj.st.numel() == cfg.num_key_value_heads * hd  # one value per column of a KV head
    with torch.no_grad():
        a.o_proj.st.copy_(torch.rand_like(a.o_proj.st) + 0.5)
    full = a.o_proj.scale_in()
    for h in range(cfg.num_attention_heads):
        assert torch.equal(full[h * hd:(h + 1) * hd], a.o_proj.st[(h // g) * hd:(h // g + 1) * hd])
    distinct = {id(p) for q in quant_layers(tiny_model).values() for p in [q.st]}
    assert len(distinct) == 4 * cfg.num_hidden_layers  # qkv, gate/up, o, down per block


def test_tied_st_folds_into_norms_and_row_scales(tiny_model):
    """The property GGUF export needs: with tied St every St moves into neighbouring weights and
    the model is unchanged, leaving each converted row as sign codes times one scale."""
    quantize_(tiny_model)
    share_st_(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for q in quant_layers(tiny_model).values():
            q.st.copy_(torch.rand_like(q.st) + 0.5)
        for q in quant_layers(tiny_model).values():
            q.fold_st()
    sts = {name: q.scale_in().detach().clone() for name, q in quant_layers(tiny_model).items()}
    unswap_(tiny_model)  # plain nn.Linear holding W_eff = row scale * sign * St
    x = torch.randint(0, 1000, (2, 16))
    want = tiny_model(input_ids=x).logits
    cfg = tiny_model.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for i, block in enumerate(tiny_model.model.layers):
            a, m, pre = block.self_attn, block.mlp, f"model.layers.{i}."
            s = sts[pre + "self_attn.q_proj"]
            block.input_layernorm.weight.mul_(s)
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                lin.weight.div_(s)
            s = sts[pre + "mlp.gate_proj"]
            block.post_attention_layernorm.weight.mul_(s)
            for lin in (m.gate_proj, m.up_proj):
                lin.weight.div_(s)
            s = sts[pre + "self_attn.o_proj"]
            a.v_proj.weight.mul_(s.view(kv, -1, hd)[:, 0, :].reshape(-1, 1))  # one value per V row
            a.o_proj.weight.div_(s)
            s = sts[pre + "mlp.down_proj"]
            m.up_proj.weight.mul_(s.view(-1, 1))
            m.down_proj.weight.div_(s)
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                mag = lin.weight.abs()
                assert torch.allclose(mag, mag[:, :1].expand_as(mag), rtol=1e-5)  # sign * row scale
    assert torch.allclose(tiny_model(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)


def test_share_st_convert_export_round_trip(trained_tiny_dir, small_text, tmp_path):
    """BaI learns the tied St; the packed export folds q/k/v and gate/up St into the norms."""
    from binarize.train import ConvertJob, convert
    from binarize.formats.latent import load_converted
    from binarize.formats import export
    from binarize.formats.packed_reader import load_packed
    from binarize.recipe import load_recipe

    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=3,
                                           calib_sequences=8, chunks=4, data=str(small_text), lr=1e-3,
                                           share_st=True))
    run = convert(ConvertJob(model=str(trained_tiny_dir), tokens=2048, out=tmp_path / "run", recipe=recipe,
                             progress=False))
    model, _, _ = load_converted(run)
    a = model.model.layers[0].self_attn
    assert a.q_proj.st is a.v_proj.st and not torch.all(a.q_proj.st == 1)  # tied, and BaI moved it
    x = torch.randint(0, 1000, (2, 24))
    want = model(input_ids=x).logits
    packed, _, meta = load_packed(export(run, tmp_path / "packed", "binary", outer_dtype="fp32"), cpu_cache="fp32")
    layers = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert sorted(meta["st_layout"]["st_folded_into_norm"]) == sorted(layers)
    assert all(n.endswith(("o_proj", "down_proj")) for n in meta["st_layout"]["st_layers"])
    assert torch.allclose(packed(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
