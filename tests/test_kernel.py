"""The Triton kernel against the quantizer module's reference, fresh random inputs every run.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest
before any test imports triton); the interpreter has no bf16, so it is checked in fp32. With CUDA the
same tests run compiled, plus fp16/bf16 and decode/prefill shapes.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()

triton = pytest.importorskip("triton")

from binarize.kernels import packed_matmul, packed_matmul_reference  # noqa: E402
from binarize.packed import PackedLinear  # noqa: E402
from binarize.packing import FORMATS, pack, unpack  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def random_layer(fmt, n, k, with_st=True):
    values = torch.tensor([-1, 1] if fmt == "binary" else [-1, 0, 1], dtype=torch.int8)
    codes = values[torch.randint(len(values), (n, k))]
    scale = torch.rand(n) * 0.1 + 0.01
    st = torch.rand(k) + 0.5 if with_st else None
    return pack(codes, fmt), scale, st


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 40, 72), (17, 96, 200), (64, 48, 64)])
@pytest.mark.parametrize("with_st", [True, False])
def test_kernel_matches_reference_fp32(fmt, m, n, k, with_st):
    q, scale, st = random_layer(fmt, n, k, with_st)
    x = torch.randn(m, k)
    want = packed_matmul_reference(x, q, scale, st, fmt, n)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = packed_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), dev(st), fmt, n).cpu()
    assert got.shape == (m, n)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


@pytest.mark.skipif(CUDA, reason="the autotuner picks the variant on a GPU; this runs one directly in the interpreter")
@pytest.mark.parametrize("fmt", ["binary", "ternary2"])
@pytest.mark.parametrize("n,k", [(48, 200), (64, 128)])
def test_the_whole_word_tile_gemv_matches_reference(fmt, n, k):
    from binarize.kernels.triton_packed import _gemv_kernel, prepare

    q, scale, st = random_layer(fmt, n, k)
    x = torch.randn(1, k)
    kw = prepare(q, fmt, n, k)
    y = torch.empty(1, n)
    block_n = 16
    _gemv_kernel.fn[(-(-n // block_n), 1, 1)](x, kw, scale, st, y, y, 0, n, k, kw.shape[0], x.stride(0), y.stride(0),
                                               BITS=1 if fmt == "binary" else 2, HAS_ST=True, SPLIT_K=1,
                                               BLOCK_N=block_n, BLOCK_KW=4, TILE3=True)
    want = packed_matmul_reference(x, q, scale, st, fmt, n)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


@pytest.mark.skipif(CUDA, reason="the autotuner picks the variant on a GPU; this runs one directly in the interpreter")
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_whole_word_dot_matches_reference(fmt):
    """The batched path that decodes a word tile once into [BLOCK_KW * CPW, BLOCK_N] and runs one dot."""
    from binarize.kernels.triton_packed import _dot_kernel, prepare

    m, n, k = 17, 40, 200
    q, scale, st = random_layer(fmt, n, k)
    x = torch.randn(m, k)
    kw = prepare(q, fmt, n, k)
    y = torch.empty(m, n)
    _dot_kernel.fn[(2, 2, 1)](x, kw, scale, st, y, y, 0, m, n, k, kw.shape[0], 32, x.stride(0), y.stride(0),
                              BITS=1 if fmt == "binary" else 2, HAS_ST=True, DOT_FP32=True, SPLIT_K=1, BLOCK_M=16,
                              BLOCK_N=32, BLOCK_KW=2, WHOLE_WORD=True)
    want = packed_matmul_reference(x, q, scale, st, fmt, n)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


@pytest.mark.parametrize("fmt", ["binary", "ternary2"])
@pytest.mark.parametrize("m", [1, 5])
def test_split_k_matches_reference(fmt, m):
    """Three programs along K per output tile, partial products summed in split order (K = 1100: 35 / 69 words);
    the same bits on a second call."""
    n, k = 24, 1100
    q, scale, st = random_layer(fmt, n, k)
    x = torch.randn(m, k)
    want = packed_matmul_reference(x, q, scale, st, fmt, n)
    got = packed_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), st.to(DEVICE), fmt, n, split_k=3).cpu()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
    again = packed_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), st.to(DEVICE), fmt, n, split_k=3).cpu()
    assert torch.equal(got, again)
    with pytest.raises(ValueError, match="split_k"):
        packed_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), st.to(DEVICE), fmt, n, split_k=0)


def test_split_k_fills_the_gpu_only_where_output_tiles_do_not(monkeypatch):
    from binarize.kernels import triton_packed

    assert triton_packed.choose_split_k(1, 2048, 256, torch.device("cpu")) == 1
    monkeypatch.setattr(triton_packed, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    for m, n, words in [(1, 2048, 256), (1, 4096, 128), (8, 4096, 128), (64, 4096, 128), (1, 8192, 64),
                        (1, 64, 2048), (256, 8192, 256), (1, 2048, 40)]:
        split = triton_packed.choose_split_k(m, n, words, gpu)
        tiles = -(-n // 64) * (1 if m == 1 else -(-m // 16))
        assert split >= 1 and split & (split - 1) == 0 and split <= 16
        assert split == 1 or (tiles * split <= 2 * 132 and words // split >= 32)  # within two programs per SM
        # and no larger power of two would still fit
        assert split == 16 or tiles * split * 2 > 2 * 132 or words // (split * 2) < 32
    assert triton_packed.choose_split_k(1, 2048, 256, gpu) == 8  # Llama-3.2-1B down_proj at batch 1
    assert triton_packed.choose_split_k(64, 4096, 128, gpu) == 1  # 256 output tiles already fill the SMs


def test_kernel_handles_batched_3d_activations():
    q, scale, st = random_layer("binary", 32, 64)
    x = torch.randn(2, 5, 64)
    got = packed_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), st.to(DEVICE), "binary", 32).cpu()
    assert torch.allclose(got, packed_matmul_reference(x, q, scale, st, "binary", 32), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["binary", "ternary2"])
@pytest.mark.parametrize("m", [1, 8, 64, 512])
def test_kernel_half_precision_on_gpu(dtype, fmt, m):
    n, k = 2048, 2048
    q, scale, st = random_layer(fmt, n, k)
    x = torch.randn(m, k, dtype=dtype)
    want = packed_matmul_reference(x.float(), q, scale, st, fmt, n)
    got = packed_matmul(x.cuda(), q.cuda(), scale.cuda(), st.cuda(), fmt, n).float().cpu()
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().std()))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_packed_linear_uses_the_kernel_on_gpu():
    layer = PackedLinear(256, 128, "binary", cpu_cache="fp32")
    q, scale, st = random_layer("binary", 128, 256)
    layer.qweight.copy_(q)
    layer.scale.copy_(scale)
    layer.st.copy_(st)
    x = torch.randn(4, 256)
    want = layer(x)  # CPU path
    got = layer.cuda()(x.cuda()).cpu()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    layer.gemv = "lut"  # one row through the activation-table kernel
    assert torch.allclose(layer(x[:1].cuda()).cpu(), want[:1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_layout_holds_every_code_once(fmt):
    """Decode the GPU layout in torch: bit group j of word w must be column j * KW + w."""
    from binarize.kernels.triton_packed import kernel_bits, prepare

    n, k = 24, 200
    q, _, _ = random_layer(fmt, n, k)
    codes = unpack(q, fmt, n, k)
    kw = prepare(q, fmt, n, k)
    bits = kernel_bits(fmt)
    cpw = 32 // bits
    words = kw.to(torch.int64) & 0xFFFFFFFF
    groups = torch.stack([(words >> (j * bits)) & ((1 << bits) - 1) for j in range(cpw)])  # [cpw, KW, N]
    decoded = (1 - 2 * groups) if bits == 1 else groups - 1
    decoded = decoded.reshape(cpw * kw.shape[0], n).t()[:, :k]
    assert torch.equal(decoded.to(torch.int8), codes)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k,split", [(100, 1), (1100, 3)])
@pytest.mark.parametrize("with_st", [True, False])
def test_lookup_table_gemv_matches_reference(fmt, k, split, with_st):
    """The activation-table kernel (one table read per 4 bits of weight) against the dequantized
    reference; K = 100 pads the last word, K = 1100 split three ways; the same bits on a second call."""
    from binarize.kernels import prepare, prepared_matmul

    n = 40
    q, scale, st = random_layer(fmt, n, k, with_st)
    x = torch.randn(1, k)
    want = packed_matmul_reference(x, q, scale, st, fmt, n)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    kw = prepare(q.to(DEVICE), fmt, n, k)
    got = prepared_matmul(x.to(DEVICE), kw, scale.to(DEVICE), dev(st), fmt, n, split_k=split, lut=True).cpu()
    assert got.shape == (1, n)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
    again = prepared_matmul(x.to(DEVICE), kw, scale.to(DEVICE), dev(st), fmt, n, split_k=split, lut=True).cpu()
    assert torch.equal(got, again)


@pytest.mark.parametrize("fmt", ["binary", "ternary2"])
def test_activation_table_holds_every_signed_sum(fmt):
    """T[w, g, p] = sum_i code_i(p) * St * x over the columns nibble g of word w holds, recomputed here
    from the layout rule (bit group j of word w is column j * KW + w)."""
    from binarize.kernels.lut_gemv import activation_table

    k = 70
    bits = 1 if fmt == "binary" else 2
    cpw, per = 32 // bits, 4 // bits
    kw = -(-k // cpw)
    x, st = torch.randn(k), torch.rand(k) + 0.5
    table = activation_table(x.to(DEVICE), st.to(DEVICE), fmt).cpu()
    assert table.shape == (kw, 8, 16)
    xs = torch.nn.functional.pad(x * st, (0, cpw * kw - k))
    for w in range(kw):
        for g in range(8):
            for p in range(16):
                want = 0.0
                for i in range(per):
                    field = (p >> (i * bits)) & ((1 << bits) - 1)
                    code = (1 - 2 * field) if bits == 1 else field - 1
                    want += code * float(xs[(g * per + i) * kw + w])
                assert abs(float(table[w, g, p]) - want) <= 1e-5 * (1 + abs(want)), (w, g, p)


def test_lookup_table_kernel_takes_one_row_and_layers_choose_it():
    from binarize.kernels import prepare, prepared_matmul
    from binarize.kernels.lut_gemv import lut_gemv
    from binarize.packed import set_gemv

    q, scale, st = random_layer("binary", 32, 64)
    kw = prepare(q.to(DEVICE), "binary", 32, 64)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="one activation row"):
        lut_gemv(x.to(DEVICE), kw, scale.to(DEVICE), st.to(DEVICE), "binary", 32)
    got = prepared_matmul(x.to(DEVICE), kw, scale.to(DEVICE), st.to(DEVICE), "binary", 32, lut=True).cpu()
    assert torch.allclose(got, packed_matmul_reference(x, q, scale, st, "binary", 32), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="split_k"):
        lut_gemv(x[:1].to(DEVICE), kw, scale.to(DEVICE), st.to(DEVICE), "binary", 32, split_k=0)
    model = torch.nn.Sequential(PackedLinear(64, 32, "binary"), torch.nn.ReLU(), PackedLinear(32, 16, "ternary2"))
    assert set_gemv(model, "lut") == 2 and all(m.gemv == "lut" for m in model if isinstance(m, PackedLinear))
    with pytest.raises(ValueError, match="unknown GEMV kernel"):
        set_gemv(model, "bitblas")
