"""GPT over code grids: the windowed mask, the relative-position bias, the KV cache and training."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_GPT, invoke
from transformer.attention import attention_index, gather_bias, windowed_attention, window_rows_index
from transformer.model import GPT, GPTConfig, position_index


def tiny(window: int = 0, grid=(4, 5), classes: int = 3, K: int = 11, dtype=torch.float64, seed: int = 0,
         pos_emb: str = "rowcol", rel_bias: bool = True) -> GPT:
    """A tiny model with large random weights (incl. the position bias and embeddings) so positions matter."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(K, classes, grid, n_layer=2, n_head=2, n_embd=16, window_size=window,
                          pos_emb=pos_emb, rel_bias=rel_bias)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


def reference_mask(H: int, W: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: visibility and bias column of every (query, key) pair, T = 1 + H*W."""
    T = 1 + H * W
    visible = torch.zeros(T, T, dtype=torch.bool)
    index = torch.full((T, T), -1)
    for q in range(T):
        visible[q, 0], index[q, 0] = True, 2 * w * w
        if q == 0:
            continue
        i, j = divmod(q - 1, W)
        for k in range(1, T):
            i2, j2 = divmod(k - 1, W)
            own_row = i2 == i and j - w <= j2 <= j
            above = i - w + 1 <= i2 <= i - 1 and j - w <= j2 <= j + w - 1
            if own_row or above:
                visible[q, k] = True
                index[q, k] = (i - i2) * 2 * w + (j2 - j) + w
    return visible, index


@pytest.mark.parametrize("H,W,w", [(4, 4, 1), (4, 4, 2), (3, 7, 2), (6, 3, 3), (5, 5, 4), (3, 4, 9), (2, 9, 5)])
def test_window_mask_matches_brute_force(H, W, w):
    index = attention_index((H, W), w, torch.device("cpu"))
    ref_visible, ref_index = reference_mask(H, W, w)
    assert torch.equal(index <= 2 * w * w, ref_visible)
    assert torch.equal(index[ref_visible], ref_index[ref_visible])
    assert torch.equal(index[~ref_visible].unique(), torch.tensor([2 * w * w + 1]))  # the masked column


@pytest.mark.parametrize("grid", [(4, 4), (3, 6), (6, 2)])
def test_full_attention_is_causal(grid):
    w = GPTConfig(8, 0, grid, 1, 1, 8, window_size=0).window
    visible = attention_index(grid, w, torch.device("cpu")) <= 2 * w * w
    T = 1 + grid[0] * grid[1]
    assert torch.equal(visible, torch.ones(T, T, dtype=torch.bool).tril())


def test_config_tokens():
    cfg = GPTConfig(codebook_size=16, num_classes=3, grid_shape=[4, 4], n_layer=1, n_head=2, n_embd=8, window_size=0)
    assert cfg.grid_shape == (4, 4)
    assert (cfg.sos_id, cfg.vocab_size, cfg.class_token(0), cfg.class_token(2)) == (16, 20, 17, 19)
    assert torch.equal(cfg.class_token(torch.tensor([0, 2])), torch.tensor([17, 19]))
    with pytest.raises(ValueError):
        cfg.class_token(3)
    with pytest.raises(ValueError):
        GPTConfig(16, 0, (4, 4), 1, 3, 8, window_size=0)  # n_embd % n_head


def test_forward_shapes_and_grid_checks():
    full, win = tiny(0), tiny(2)
    tokens = torch.randint(11, (3, 1 + 20))
    tokens[:, 0] = full.config.sos_id
    assert full(tokens).shape == (3, 21, 11)  # the head covers the codes only
    assert full(tokens[:, :5]).shape == (3, 5, 11)
    with pytest.raises(ValueError, match="full-attention"):
        full(tokens[:, :5], grid_shape=(8, 10))
    big = torch.randint(11, (2, 1 + 80))
    assert win(big, grid_shape=(8, 10)).shape == (2, 81, 11)  # a window model takes any grid
    with pytest.raises(ValueError, match="sequence length"):
        full(torch.zeros(1, 22, dtype=torch.long))


def decode_all(model: GPT, tokens: torch.Tensor, grid, n_prefill: int, static: bool = False) -> torch.Tensor:
    """Logits for positions n_prefill-1 ... T-1 via prefill + decode steps."""
    model.setup_cache(tokens.shape[0], grid)
    if static:  # the fixed-shape path that compile=True uses on CUDA, run eagerly
        model._use_compiled, model._compiled = True, model._decode
    out = [model.prefill(tokens[:, :n_prefill])]
    for t in range(n_prefill, tokens.shape[1]):
        out.append(model.decode_step(tokens[:, t], t - 1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("window,grid,gen_grid,n_prefill", [
    (0, (4, 5), (4, 5), 1),    # full attention (row-major ring, reads only written slots)
    (0, (4, 5), (4, 5), 8),    # ... after a prefill of 7 context codes
    (3, (4, 5), (4, 5), 1),    # window as wide as the grid: row-major ring that wraps
    (2, (4, 5), (4, 5), 1),    # narrow window: column-major ring, column slices
    (2, (4, 5), (9, 11), 1),   # larger grid than trained on
    (2, (4, 5), (9, 11), 40),  # larger grid with a long context (ring partly overwritten)
    (5, (4, 5), (3, 4), 2),    # window larger than the grid
])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("pos_emb,rel_bias", [("rowcol", True), ("none", True), ("rowcol", False)])
def test_cache_matches_recompute(window, grid, gen_grid, n_prefill, static, pos_emb, rel_bias):
    model = tiny(window, grid, pos_emb=pos_emb, rel_bias=rel_bias)
    H, W = gen_grid
    with torch.inference_mode():
        tokens = torch.randint(11, (3, 1 + H * W))
        tokens[:, 0] = torch.tensor([model.config.sos_id, model.config.class_token(0), model.config.class_token(2)])
        full = model(tokens, gen_grid)
        cached = decode_all(model, tokens, gen_grid, n_prefill, static)
    torch.testing.assert_close(cached, full[:, n_prefill - 1:], rtol=1e-10, atol=1e-10)


def test_decode_switches_batch_sizes_and_follows_weight_updates():
    """A model that decoded one row and then decodes three (a server, generate's last chunk) reallocates its
    cache; after an in-place weight change (an optimizer step, load_state_dict) the decode step uses the new
    weights: the plain module calls hold no copy of them."""
    model = tiny(window=2)
    with torch.inference_mode():
        tokens = torch.randint(11, (3, 21))
        tokens[:, 0] = model.config.sos_id
        for rows in (1, 3, 1):
            torch.testing.assert_close(decode_all(model, tokens[:rows], (4, 5), 1), model(tokens[:rows]),
                                       rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        model.blocks[1].mlp[2].weight.mul_(3)
        model.head.weight.add_(0.5)
        model.blocks[0].attn.rel_bias.add_(1.0)
    with torch.inference_mode():
        model.setup_cache(2)  # the bias tables are gathered at setup: call it again after the weights change
        torch.testing.assert_close(decode_all(model, tokens[:2], (4, 5), 1), model(tokens[:2]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 2])
def test_bf16_decoding_agrees_with_fp32(window):
    """Weights and KV cache in bfloat16 (generate --precision bf16): the cache is bf16, decoding runs on CPU and
    its logits stay close to float32's, picking the same most likely code almost everywhere."""
    model = tiny(window, grid=(6, 6), K=64, dtype=torch.float32)
    with torch.no_grad():  # realistic scales: large random weights make logits that bf16 cannot resolve
        for p in model.parameters():
            p.mul_(0.25)
    tokens = torch.randint(64, (4, 37))
    tokens[:, 0] = model.config.sos_id
    with torch.inference_mode():
        ref = decode_all(model, tokens, (6, 6), 1)
        model.to(torch.bfloat16)
        half = decode_all(model, tokens, (6, 6), 1)
        assert model._caches[0].kv.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    half = half.float()
    assert (half - ref).abs().max() < 0.1 * ref.abs().max()
    assert (half.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_cache_memory_bounded_by_window():
    model = tiny(window=3, grid=(8, 8), dtype=torch.float32)

    def cache_shapes(grid):
        model.setup_cache(2, grid)
        return [tuple(c.kv.shape) for c in model._caches] + [tuple(model._pattern_index.shape)]  # + pattern table

    assert cache_shapes((8, 8)) == cache_shapes((32, 8))  # grid height does not matter
    assert cache_shapes((8, 8))[0] == (2, 2, 2, (3 + 1) * 8, 8)  # R = w rows of the grid width + a prefix per column
    assert cache_shapes((8, 16))[0] == (2, 2, 2, (3 + 1) * 16, 8)


def test_no_absolute_positions_without_pos_emb():
    """Shifting a grid down by whole rows leaves the logits of rows whose receptive field stays inside unchanged."""
    model = tiny(window=2, grid=(4, 4), pos_emb="none")  # 2 layers x (w-1) rows above = receptive field of 2 rows up
    grid = torch.randint(11, (5, 6))
    shifted = torch.cat([torch.randint(11, (3, 6)), grid])
    sos = torch.tensor([model.config.sos_id])
    with torch.no_grad():
        a = model(torch.cat([sos, grid.flatten()])[None], (5, 6))[0, 1:].view(5, 6, -1)
        b = model(torch.cat([sos, shifted.flatten()])[None], (8, 6))[0, 1:].view(8, 6, -1)
    torch.testing.assert_close(a[2:], b[5:], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a[:2], b[3:5])  # the top rows did see the extra rows


def test_training_reduces_loss_and_reaches_every_parameter():
    torch.manual_seed(0)
    model = GPT(GPTConfig(16, 2, (4, 4), n_layer=2, n_head=2, n_embd=32, window_size=2)).train()
    seq = torch.randint(16, (4, 17))
    seq[:, 0] = model.config.class_token(torch.tensor([0, 1, 0, 1]))
    opt = model.configure_optimizers(weight_decay=0.01, lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 16), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if not losses:
            unused = {"tok_emb"}  # rows of unseen tokens get no gradient, but the table as a whole does
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not [n for n in missing if n.split(".")[0] not in unused], missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_optimizer_decays_linear_weights_only():
    model = tiny(window=2, dtype=torch.float32)
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("grid,w", [((5, 6), 2), ((4, 3), 3), ((6, 4), 1)])
def test_windowed_attention_equals_dense(grid, w):
    """The block-sparse attention gives the dense masked attention's outputs and gradients."""
    H, W = grid
    torch.manual_seed(0)
    qkv = torch.randn(2, 1 + H * W, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    rel_bias = torch.randn(3, 2 * w * w + 1, dtype=torch.float64, requires_grad=True)
    bias = gather_bias(rel_bias, attention_index(grid, w, torch.device("cpu")))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
    w_bias = gather_bias(rel_bias, window_rows_index(grid, w, torch.device("cpu")))
    sparse = windowed_attention(qkv, w_bias, grid, w, 0.0)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(dense)
    grads = torch.autograd.grad(dense, (qkv, rel_bias), g)
    for a, b in zip(torch.autograd.grad(sparse, (qkv, rel_bias), g), grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_windowed_attention_dropout_gradients():
    """With attention dropout the hand-written backward is the derivative of the forward (each call drawing
    the same dropout mask)."""
    grid, w, p = (3, 4), 2, 0.3
    qkv = torch.randn(2, 13, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    rel_bias = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    index = window_rows_index(grid, w, torch.device("cpu"))

    def attend(qkv, rel_bias, p=p):
        torch.manual_seed(1)
        return windowed_attention(qkv, gather_bias(rel_bias, index), grid, w, p)
    assert torch.autograd.gradcheck(attend, (qkv, rel_bias))
    assert not torch.allclose(attend(qkv, rel_bias), attend(qkv, rel_bias, 0.0))  # dropout did something


def test_windowed_attention_float32_softmax_of_half_inputs(monkeypatch):
    """CUDA autocast runs softmax in float32 on bfloat16 scores; the hand-written backward then mixes the two
    dtypes (simulated here on the CPU, whose autocast keeps softmax in bfloat16): gradients still match float64."""
    grid, w = (4, 5), 2
    torch.manual_seed(0)
    qkv = torch.randn(2, 21, 3, 2, 4, dtype=torch.float64)
    rel_bias = torch.randn(2, 9, dtype=torch.float64)
    index = window_rows_index(grid, w, torch.device("cpu"))
    g = torch.randn(2, 21, 8, dtype=torch.float64)

    def grads(dtype):
        x, b = qkv.to(dtype).requires_grad_(), rel_bias.clone().requires_grad_()
        out = windowed_attention(x, gather_bias(b.to(dtype), index), grid, w, 0.1)
        return torch.autograd.grad(out, (x, b), g.to(dtype))
    torch.manual_seed(1)
    expected = grads(torch.float64)
    softmax = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, "softmax", lambda t, dim: softmax(t, dim, dtype=torch.float32))
    torch.manual_seed(1)
    for a, b in zip(grads(torch.bfloat16), expected):
        torch.testing.assert_close(a.double(), b, rtol=0.05, atol=0.05)


def test_windowed_attention_compiles():
    """torch.compile (train --compile) captures the hand-written forward and backward: same loss and gradients
    (aot_eager: the same graph capture and compiled backward as inductor, without its C++ code generation)."""
    model = tiny(window=2, grid=(6, 7)).train()
    tokens = torch.randint(11, (2, 1 + 6 * 7))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = [torch.autograd.grad(m(tokens).square().sum(), model.parameters()) for m in (model, compiled)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [1 + 6 * 7, 6 * 7, 20, 9])  # whole grid, training length, partial rows
def test_block_sparse_model_equals_dense(T):
    model = tiny(window=2, grid=(6, 7)).train()  # dropout 0: train mode is deterministic
    tokens = torch.randint(11, (2, T))
    sparse = model(tokens)
    model.block_sparse = False
    dense = model(tokens)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)
    (g_dense,) = torch.autograd.grad(dense.square().sum(), model.blocks[0].attn.rel_bias)
    model.block_sparse = True
    (g_sparse,) = torch.autograd.grad(model(tokens).square().sum(), model.blocks[0].attn.rel_bias)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window,T", [(0, 21), (0, 8), (2, 21), (2, 13)])
def test_no_rel_bias_equals_zero_bias(window, T):
    """--no-rel-bias is the biased model with its bias at zero; full attention then takes SDPA's causal kernel
    with no mask (what reaches flash/efficient attention on GPU), window models keep their mask."""
    plain = tiny(window, rel_bias=False)
    assert all(blk.attn.rel_bias is None for blk in plain.blocks)
    biased = tiny(window)
    with torch.no_grad():
        for blk in biased.blocks:
            blk.attn.rel_bias.zero_()
    biased.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(11, (2, T))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", spy)
        out = plain(tokens)
    torch.testing.assert_close(out, biased(tokens), rtol=1e-10, atol=1e-10)
    if window == 0:
        assert calls and all(c.get("is_causal") and c.get("attn_mask") is None for c in calls)
    with pytest.raises(ValueError, match="pos_emb='rowcol'"):
        tiny(window, pos_emb="none", rel_bias=False)


def test_position_index_rule():
    idx = lambda n, t: position_index(n, t, torch.device("cpu")).tolist()  # noqa: E731
    assert idx(4, 4) == idx(4, 9) == [0, 1, 2, 3]  # up to the training size: the identity
    # larger: the first and last trained//2 keep their border embeddings, the middle takes the centre one
    assert idx(9, 4) == [0, 1, 2, 2, 2, 2, 2, 2, 3]
    assert idx(7, 5) == [0, 1, 2, 2, 2, 3, 4]


def test_position_embeddings_matter_and_old_checkpoints_load_without():
    model = tiny(window=2, grid=(4, 4))
    grid = torch.randint(11, (5, 6))
    sos = torch.tensor([model.config.sos_id])
    with torch.no_grad():  # with positions, the same rows placed lower give other logits
        a = model(torch.cat([sos, grid.flatten()])[None], (5, 6))[0, 1:].view(5, 6, -1)
        b = model(torch.cat([sos, torch.randint(11, (3, 6)).flatten(), grid.flatten()])[None], (8, 6))[0, 1:]
    assert not torch.allclose(a[2:], b.view(8, 6, -1)[5:])
    old = tiny(window=2, grid=(4, 4), pos_emb="none")
    cfg = {k: v for k, v in vars(old.config).items() if k != "pos_emb"}  # a config saved before the field
    loaded = GPT(GPTConfig.from_saved(cfg)).double()
    loaded.load_state_dict(old.state_dict())  # strict
    assert loaded.config.pos_emb == "none" and loaded.row_emb is None
    assert GPTConfig.from_saved(vars(model.config)).pos_emb == "rowcol"
    tokens = torch.randint(11, (2, 17))
    torch.testing.assert_close(loaded(tokens), old(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pos_emb"):
        GPTConfig(8, 0, (4, 4), 1, 1, 8, window_size=0, pos_emb="sincos")


@pytest.mark.parametrize("rel_bias", [True, False])
@pytest.mark.parametrize("T", [1 + 6 * 7, 20, 9])  # whole grid, partial rows
def test_flex_attention_forward_equals_dense(T, rel_bias):
    """The window model through FlexAttention (block mask + score_mod bias; its training path on CUDA) gives the
    dense masked logits. On CPU FlexAttention has a forward only: its backward is checked in the CUDA test."""
    model = tiny(window=2, grid=(6, 7), rel_bias=rel_bias)
    tokens = torch.randint(11, (2, T))
    with torch.no_grad():
        model.flex = True
        flex = model(tokens)
        model.block_sparse = False
        dense = model(tokens)
    torch.testing.assert_close(flex, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
def test_cuda_flex_attention_trains_like_dense():
    """On CUDA, a window model's training forward and backward (the bias table's gradient included) through
    compiled FlexAttention equal the dense masked attention's."""
    model = tiny(window=2, grid=(8, 8), dtype=torch.float32).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)
    tokens = torch.randint(11, (4, 1 + 64), device="cuda")
    results = []
    for flex in (True, False):
        model.flex, model.block_sparse = flex, flex
        loss = model(tokens).float().square().mean()
        results.append((loss, torch.autograd.grad(loss, [model.blocks[0].attn.rel_bias, model.blocks[1].attn.qkv.weight])))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("rel_bias", [True, False])
def test_cuda_default_model_reaches_fused_sdpa_kernels(rel_bias):
    """Training and prefill of a full-attention model run on SDPA's fused kernels under bf16 autocast: the
    relative bias as an additive float mask in the query's dtype on the memory-efficient kernel; without it,
    is_causal on flash. Restricting SDPA to that kernel raises if it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny(0, grid=(8, 8), dtype=torch.float32, rel_bias=rel_bias).cuda().train()
    tokens = torch.randint(11, (4, 1 + 64), device="cuda")
    kernel = SDPBackend.EFFICIENT_ATTENTION if rel_bias else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(kernel), torch.autocast("cuda", torch.bfloat16):
        model(tokens).float().square().mean().backward()
        model.eval().setup_cache(4)
        with torch.inference_mode():
            assert model.prefill(tokens[:, :10]).isfinite().all()


@pytest.mark.parametrize("window", [0, 2])
def test_static_decode_step_compiles_as_one_graph(window):
    """The fixed-shape step that generate --compile puts into CUDA graphs traces whole (fullgraph: the blocks'
    parameter tuples and the cache's index writes included) and gives the eager step's logits; on CPU through
    aot_eager (the same capture as inductor, no code generation)."""
    model = tiny(window, grid=(4, 5))
    tokens = torch.randint(11, (3, 21))
    tokens[:, 0] = model.config.sos_id
    with torch.inference_mode():
        eager = decode_all(model, tokens, (4, 5), 1)
        model.setup_cache(3, (4, 5))
        model._use_compiled = True
        model._compiled = torch.compile(model._decode, backend="aot_eager", fullgraph=True)
        out = [model.prefill(tokens[:, :1])] + [model.decode_step(tokens[:, t], t - 1) for t in range(1, 21)]
    torch.testing.assert_close(torch.stack(out, 1), eager, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("window", [0, 2])
def test_cuda_compiled_decode_equals_eager(window):
    """generate --compile on CUDA: the decode step in CUDA graphs (mode="reduce-overhead") gives the eager
    step's logits."""
    model = tiny(window, grid=(6, 6), dtype=torch.float32).cuda()
    tokens = torch.randint(11, (3, 37), device="cuda")
    tokens[:, 0] = model.config.sos_id
    with torch.inference_mode():
        eager = decode_all(model, tokens, (6, 6), 1)
        model.setup_cache(3, compile=True)
        out = [model.prefill(tokens[:, :1])]
        for t in range(1, 37):
            out.append(model.decode_step(tokens[:, t], t - 1).clone())
    torch.testing.assert_close(torch.stack(out, 1), eager, rtol=1e-4, atol=1e-4)


def test_a_run_on_large_grids_says_what_attention_will_cost():
    """Grids of a 256-px image at the default downsampling (64x64, 4,097 tokens) keep gigabytes of attention scores
    per layer: the run says so before it starts, with options that cut it; the micro-batch it suggests fits and
    keeps the batch. Small grids and the fused kernels (no bias) get no note."""
    import dataclasses

    from transformer.config import GPTTrainConfig
    from transformer.train import SCORES_NOTE_BYTES, attention_memory_note

    cfg = GPTTrainConfig(quantize_run_id="x")
    assert attention_memory_note(cfg, (8, 8)) is None and attention_memory_note(cfg, (32, 32)) is None
    assert attention_memory_note(dataclasses.replace(cfg, rel_bias=False), (64, 64)) is None
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = dataclasses.replace(cfg, batch_size=int(rng.integers(1, 65)), grad_accum=int(rng.integers(1, 4)),
                                n_layer=int(rng.integers(1, 9)), n_head=int(rng.choice([1, 2, 4, 8])),
                                window_size=int(rng.choice([0, 0, 4, 8])), rel_bias=bool(rng.random() < 0.8))
        grid = (int(rng.integers(4, 97)), int(rng.integers(4, 97)))
        note = attention_memory_note(c, grid)
        T = 1 + grid[0] * grid[1]
        keys = min(T, c.window_size * (1 + grid[1])) if c.window_size else T
        scores = c.n_layer * c.n_head * T * keys * 4
        assert (note is not None) == ((c.rel_bias or c.window_size > 0) and c.batch_size * scores > SCORES_NOTE_BYTES)
        if note and c.batch_size > 1:
            b, k = (int(v) for v in re.search(r"--batch-size (\d+) --grad-accum (\d+)", note).groups())
            assert b * k == c.batch_size * c.grad_accum and b < c.batch_size
            assert b * scores <= SCORES_NOTE_BYTES or b == 1
    note = attention_memory_note(cfg, (64, 64))
    assert note.startswith("64x64 grids: 4,097 tokens a sequence; attention computes 4,097x4,097 scores per head "
                           "and sequence, ~8.0 GiB a layer at --batch-size 32")
    assert "--no-rel-bias" in note


def test_the_note_on_attention_memory_comes_before_the_run(quantize_run, monkeypatch):
    import transformer.train

    monkeypatch.setattr(transformer.train, "SCORES_NOTE_BYTES", 1)  # the tiny chain's grids count as large
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("note: ") == 1 and "tokens a sequence; attention computes" in res.stderr
