"""Tests for traduire.model: masking, causality, the incremental cache, attention weights, size."""

from __future__ import annotations

import pytest
import torch

from traduire.model import AttentionWeights, Transformer, TransformerShape

PAD, BOS, EOS = 0, 2, 3
VOCAB = 48


def tiny(norm: str = "pre", seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    values = dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=32, heads=4, ffn_dim=64,
                  encoder_layers=2, decoder_layers=2, dropout=0.1, max_positions=64, norm=norm)
    values.update(kwargs)
    return Transformer(TransformerShape(**values)).eval()


def random_tokens(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=gen)


NORMS = pytest.mark.parametrize("norm", ["pre", "post"])


@NORMS
@torch.no_grad()
def test_encoder_is_bidirectional(norm):
    model = tiny(norm)
    src = random_tokens(2, 7, seed=1)
    changed = src.clone()
    changed[:, -1] = torch.where(src[:, -1] == 4, 5, 4)  # only the last token differs
    memory, _ = model.encode(src)
    memory_changed, _ = model.encode(changed)
    # The first position sees the last one: its encoding changes.
    assert not torch.allclose(memory[:, 0], memory_changed[:, 0], atol=1e-4)


@NORMS
@torch.no_grad()
def test_decoder_is_causal(norm):
    model = tiny(norm)
    src = random_tokens(2, 6, seed=2)
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 7, seed=3)], dim=1)
    changed = tgt.clone()
    changed[:, 5] = torch.where(tgt[:, 5] == 4, 5, 4)
    logits, logits_changed = model(src, tgt), model(src, changed)
    torch.testing.assert_close(logits[:, :5], logits_changed[:, :5], atol=1e-6, rtol=0)
    # The changed position and those after it do see the change.
    assert not torch.allclose(logits[:, 5:], logits_changed[:, 5:], atol=1e-4)


@NORMS
@torch.no_grad()
def test_padding_is_masked(norm):
    model = tiny(norm)
    src = random_tokens(3, 5, seed=4)
    tgt = torch.cat([torch.full((3, 1), BOS), random_tokens(3, 6, seed=5)], dim=1)
    logits = model(src, tgt)
    padded_src = torch.cat([src, torch.full((3, 4), PAD)], dim=1)
    padded_tgt = torch.cat([tgt, torch.full((3, 3), PAD)], dim=1)
    padded_logits = model(padded_src, padded_tgt)
    assert padded_logits.shape == (3, 10, VOCAB)
    torch.testing.assert_close(padded_logits[:, :7], logits, atol=1e-5, rtol=0)


@NORMS
@torch.no_grad()
def test_sentence_alone_equals_sentence_in_a_padded_batch(norm):
    model = tiny(norm)
    short_src, long_src = random_tokens(1, 3, seed=6), random_tokens(1, 8, seed=7)
    short_tgt = torch.tensor([[BOS, 9, 10]])
    long_tgt = torch.tensor([[BOS, 11, 12, 13, 14, 15]])
    src = torch.full((2, 8), PAD)
    src[0, :3], src[1] = short_src[0], long_src[0]
    tgt = torch.full((2, 6), PAD)
    tgt[0, :3], tgt[1] = short_tgt[0], long_tgt[0]
    batched = model(src, tgt)
    torch.testing.assert_close(batched[0, :3], model(short_src, short_tgt)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], model(long_src, long_tgt)[0], atol=1e-5, rtol=0)


@NORMS
@torch.no_grad()
def test_incremental_decoding_matches_full_forward(norm):
    model = tiny(norm)
    src = torch.cat([random_tokens(2, 6, seed=8), torch.full((2, 1), EOS)], dim=1)
    src[1, 4:] = PAD  # the second source is shorter
    src[1, 3] = EOS
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 6, seed=9)], dim=1)
    full = model(src, tgt)

    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, i:i + 1], memory, src_mask, cache=cache)
             for i in range(tgt.size(1))]
    assert cache.length == tgt.size(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_reorder_selects_rows():
    model = tiny()
    src = random_tokens(3, 5, seed=10)
    tgt = torch.cat([torch.full((3, 1), BOS), random_tokens(3, 3, seed=11)], dim=1)
    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    model.decode(tgt[:, :3], memory, src_mask, cache=cache)
    index = torch.tensor([2, 0])
    cache.reorder(index, index)
    step = model.decode(tgt[index, 3:4], memory[index], src_mask[index], cache=cache)
    torch.testing.assert_close(step[:, 0], model(src[index], tgt[index])[:, 3], atol=1e-5,
                               rtol=1e-5)


@torch.no_grad()
def test_reorder_without_sources_keeps_the_cross_attention_cache():
    model = tiny()
    src = random_tokens(2, 5, seed=14)
    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    tgt = torch.full((4, 1), BOS)  # two hypotheses per source
    model.decode(tgt, memory, src_mask, cache=cache)
    cross_before = [layer["cross"]["k"] for layer in cache.layers]
    cache.reorder(torch.tensor([1, 0, 3, 2]))
    assert all(layer["cross"]["k"] is k for layer, k in zip(cache.layers, cross_before))
    cache.reorder(torch.tensor([2, 3]), torch.tensor([1]))
    assert all(layer["cross"]["k"].size(0) == 1 for layer in cache.layers)
    assert all(layer["self"]["k"].size(0) == 2 for layer in cache.layers)


@NORMS
@torch.no_grad()
def test_hypotheses_sharing_a_source_equal_their_own_copies(norm):
    """Beam search feeds g rows per source and one copy of the encoder output; that must
    give what repeating the encoder output g times gives, weights included."""
    model = tiny(norm)
    src = random_tokens(2, 6, seed=15)
    src[1, 4:] = PAD
    tgt = torch.cat([torch.full((6, 1), BOS), random_tokens(6, 4, seed=16)], dim=1)
    memory, src_mask = model.encode(src)
    group = 3
    copies = torch.arange(2).repeat_interleave(group)
    shared, copied = AttentionWeights([], [], []), AttentionWeights([], [], [])
    logits = model.decode(tgt, memory, src_mask, attention=shared)
    expected = model.decode(tgt, memory[copies], src_mask[copies], attention=copied)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(shared.decoder_cross, copied.decoder_cross):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="evenly"):
        model.decode(tgt[:5], memory, src_mask)


@NORMS
@torch.no_grad()
def test_attention_weights(norm):
    model = tiny(norm)
    src = random_tokens(2, 6, seed=12)
    src[0, 4:] = PAD
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 4, seed=13)], dim=1)
    plain = model(src, tgt)
    attention = AttentionWeights([], [], [])
    logits = model(src, tgt, attention=attention)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)

    layers, heads = 2, 4
    assert len(attention.encoder) == len(attention.decoder_self) == layers
    assert len(attention.decoder_cross) == layers
    for w in attention.encoder:
        assert w.shape == (2, heads, 6, 6)
    for w in attention.decoder_self:
        assert w.shape == (2, heads, 5, 5)
    for w in attention.decoder_cross:
        assert w.shape == (2, heads, 5, 6)
    for w in attention.encoder + attention.decoder_self + attention.decoder_cross:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
        assert (w >= 0).all()
    # No weight on source padding (row 0 has two pad positions), from encoder or decoder.
    for w in attention.encoder + attention.decoder_cross:
        assert (w[0, :, :, 4:] == 0).all()
        assert (w[0, :, :, :4] > 0).all()
        assert (w[1] > 0).all()
    # No weight on future target positions.
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for w in attention.decoder_self:
        assert (w[:, :, future] == 0).all()
        assert (w[:, :, ~future] > 0).all()


@torch.no_grad()
def test_unshared_embeddings_with_different_vocabularies():
    model = tiny(share_embeddings=False, src_vocab_size=40, tgt_vocab_size=56)
    assert model.encoder.embedding is not model.decoder.embedding
    assert model.encoder.embedding.weight.shape == (40, 32)
    assert model.decoder.embedding.weight.shape == (56, 32)
    src = random_tokens(2, 5, seed=14, vocab=40)
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 4, seed=15, vocab=56)], dim=1)
    logits = model(src, tgt)
    assert logits.shape == (2, 5, 56)
    assert torch.isfinite(logits).all()
    # Source ids beyond the target vocabulary are valid: they index the source embedding.
    assert torch.isfinite(model(torch.full((1, 3), 39), tgt[:1])).all()


def test_shared_embeddings_need_equal_vocabularies():
    with pytest.raises(ValueError):
        tiny(share_embeddings=True, src_vocab_size=40, tgt_vocab_size=56)


def test_shared_embedding_is_one_matrix():
    model = tiny()
    assert model.encoder.embedding is model.decoder.embedding
    unshared = tiny(share_embeddings=False)
    assert unshared.num_parameters() - model.num_parameters() == VOCAB * 32


def test_pad_embedding_is_zero():
    model = tiny()
    assert (model.decoder.embedding.weight[PAD] == 0).all()


def test_too_long_sequence_names_max_positions():
    model = tiny(max_positions=8)
    with pytest.raises(ValueError, match="max_positions"):
        model(random_tokens(1, 9, seed=16), torch.tensor([[BOS]]))


def test_dropout_only_in_training_mode():
    model = tiny()
    src = random_tokens(2, 5, seed=17)
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 4, seed=18)], dim=1)
    with torch.no_grad():
        assert torch.equal(model(src, tgt), model(src, tgt))
        model.train()
        assert not torch.allclose(model(src, tgt), model(src, tgt))


def test_gradients_reach_every_parameter():
    model = tiny().train()
    src = random_tokens(2, 5, seed=19)
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 4, seed=20)], dim=1)
    model(src, tgt).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def expected_parameters(vocab: int, d: int, ffn: int, enc: int, dec: int, pre_norm: bool) -> int:
    """Counted from the architecture: one shared embedding (also the output projection),
    linear layers with biases, LayerNorms with weight and bias, no learned positions."""
    def linear(n_in, n_out):
        return n_in * n_out + n_out

    layer_norm = 2 * d
    self_attention = linear(d, 3 * d) + linear(d, d)
    cross_attention = linear(d, d) + linear(d, 2 * d) + linear(d, d)
    feed_forward = linear(d, ffn) + linear(ffn, d)
    encoder_layer = self_attention + feed_forward + 2 * layer_norm
    decoder_layer = self_attention + cross_attention + feed_forward + 3 * layer_norm
    final_norms = 2 * layer_norm if pre_norm else 0
    return vocab * d + enc * encoder_layer + dec * decoder_layer + final_norms


def test_parameter_count_of_the_benchmark_shape():
    model = Transformer(TransformerShape(src_vocab_size=8000, tgt_vocab_size=8000, d_model=256,
                                         heads=4, ffn_dim=1024, encoder_layers=3,
                                         decoder_layers=3, share_embeddings=True))
    expected = expected_parameters(8000, 256, 1024, 3, 3, pre_norm=True)
    assert model.num_parameters() == expected
    assert 7.5e6 < expected < 7.7e6


def test_parameter_count_post_norm_and_uneven_depth():
    model = tiny("post", encoder_layers=1, decoder_layers=3)
    assert model.num_parameters() == expected_parameters(VOCAB, 32, 64, 1, 3, pre_norm=False)


def embedded_target(model: Transformer, src: torch.Tensor, tgt: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of model(src, tgt), and the embedded target the decoder starts from (batch,
    length, d_model): the output of the first module to finish on `tgt` itself. Found by what
    it does rather than by name, and told from the source's call to a shared embedding by the
    identity of its input."""
    found: list[torch.Tensor] = []

    def keep(module, inputs, output):
        if not found and inputs and inputs[0] is tgt and isinstance(output, torch.Tensor) \
                and output.is_floating_point():
            found.append(output)

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        logits = model(src, tgt)
    finally:
        handle.remove()
    assert found and found[0].shape[:2] == tgt.shape and found[0].requires_grad
    return logits, found[0]


@NORMS
def test_decoder_is_causal_with_gradients_on(norm):
    """The causality tests above run under no_grad, where attention masks the future
    explicitly. A training step (fp32, gradients on) takes torch's fused attention instead,
    whose only guard against the future is its is_causal flag: the same promise, checked on
    that path, for the logits and for their gradients."""
    model = tiny(norm, dropout=0.0).train()  # no dropout: two passes compare exactly
    src = random_tokens(2, 6, seed=21)
    tgt = torch.cat([torch.full((2, 1), BOS), random_tokens(2, 7, seed=22)], dim=1)
    length = tgt.size(1)
    assert torch.is_grad_enabled()
    logits, embedded = embedded_target(model, src, tgt)
    assert logits.requires_grad and logits.dtype == torch.float32
    for j in range(1, length):
        changed = tgt.clone()
        changed[:, j] = torch.where(tgt[:, j] == 4, 5, 4)
        logits_changed = model(src, changed)
        torch.testing.assert_close(logits_changed[:, :j], logits[:, :j], atol=1e-6, rtol=0)
        # Position j sees its own token, and every later one sees position j.
        for later in range(j, length):
            assert not torch.allclose(logits_changed[:, later], logits[:, later], atol=1e-4)
    # The logits at position i owe nothing to later target positions: their gradient with
    # respect to those positions' embeddings is exactly zero (and not to earlier ones).
    directions = torch.randn(logits.shape, generator=torch.Generator().manual_seed(23))
    for i in range(length):
        (grad,) = torch.autograd.grad(logits[:, i], embedded, grad_outputs=directions[:, i],
                                      retain_graph=True)
        assert torch.count_nonzero(grad[:, i + 1:]) == 0, i
        assert (grad[:, :i + 1].abs().sum(-1) > 0).all(), i


# --- The additive padding mask ---------------------------------------------------------------


def test_additive_mask_is_zero_where_allowed_and_minus_infinity_elsewhere():
    from traduire.model import additive_mask

    mask = torch.tensor([[True, True, False]])[:, None, None, :]
    additive = additive_mask(mask, torch.float32)
    assert additive.dtype == torch.float32 and additive.shape == mask.shape
    assert additive.flatten().tolist() == [0.0, 0.0, float("-inf")]
    assert additive_mask(additive, torch.bfloat16) is additive  # already additive
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert additive_mask(mask, torch.float32).dtype == torch.bfloat16  # the queries' dtype


@pytest.mark.parametrize("mode", ["eval", "train-fp32", "train-bf16"])
def test_additive_mask_gives_the_boolean_masks_outputs_and_gradients(mode, monkeypatch):
    """The teacher-forced pass with one additive mask for every layer equals the pass with the
    boolean mask handed to every layer, through the explicit form (evaluation, bf16 training on
    CPU) and the fused kernel (fp32 training on CPU) alike."""
    from traduire import model as model_module

    src = torch.cat([random_tokens(3, 6, seed=20), torch.full((3, 3), PAD)], dim=1)
    src[1, 6:] = random_tokens(1, 3, seed=21)  # rows padded differently
    tgt = torch.cat([torch.full((3, 1), BOS), random_tokens(3, 5, seed=22)], dim=1)
    dtype = torch.bfloat16 if mode == "train-bf16" else None

    def run(boolean: bool):
        if boolean:
            monkeypatch.setattr(model_module, "additive_mask", lambda mask, dtype: mask)
        else:
            monkeypatch.undo()
        model = tiny(dropout=0.0)
        model.train(mode != "eval")
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(src, tgt)
        logits.float().square().mean().backward()
        return logits.float().detach(), [p.grad.clone() for p in model.parameters()]

    want, want_grads = run(boolean=True)
    got, got_grads = run(boolean=False)
    tolerance = 1e-2 if dtype else 1e-5
    torch.testing.assert_close(got, want, atol=tolerance, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=tolerance, rtol=tolerance)
