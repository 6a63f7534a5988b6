"""Tests for traduire.analysis: attention between words, forced decoding and confidence, and
the Translator methods that show them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from traduire.analysis import (
    confidence,
    find_word,
    group_pieces,
    merge_attention,
    score_ids,
    word_labels,
)
from traduire.errors import TraduireError
from traduire.model import AttentionWeights, Transformer, TransformerShape
from traduire.translate import DecodeOptions
from traduire.translate_files import translate_file

SENTENCES = ["the big dog sleeps here", "a cat runs", "the small red bird sings today"]


@pytest.fixture(scope="module")
def translator(inspect_run):
    from traduire.translate import Translator

    # fp32: these tests compare scores across code paths to 1e-4.
    return Translator.load(inspect_run, device="cpu", precision="fp32")


# --- the model's attention weights -------------------------------------------------------------


def test_attention_rows_sum_to_one_and_respect_masks():
    torch.manual_seed(0)
    model = Transformer(TransformerShape(src_vocab_size=20, tgt_vocab_size=20, d_model=16,
                                         heads=2, ffn_dim=32, encoder_layers=2,
                                         decoder_layers=2, max_positions=32)).eval()
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]])  # second row: two pads
    tgt_in = torch.tensor([[2, 9, 10], [2, 11, 12]])
    attention = AttentionWeights([], [], [])
    with torch.no_grad():
        model(src, tgt_in, attention=attention)
    real = (src != 0)[:, None, None, :]  # (batch, 1, 1, src_len)
    for weights in attention.encoder + attention.decoder_cross:
        assert weights.shape[:2] == (2, 2)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights.masked_select(~real.expand_as(weights)) == 0).all()
    future = torch.ones(3, 3, dtype=torch.bool).triu(1)
    for weights in attention.decoder_self:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights[..., future] == 0).all()
        assert (weights[..., ~future] > 0).all()


def test_asking_for_weights_changes_nothing(translator):
    model, tok = translator.model, translator.tokenizer
    src_ids, _ = translator.encode(SENTENCES)
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(s + [tok.eos_id]) for s in src_ids],
                                          batch_first=True, padding_value=tok.pad_id)
    tgt_in = torch.tensor([[tok.bos_id, 5, 6, 7]] * len(SENTENCES))
    with torch.no_grad():
        plain = model(src, tgt_in)
        watched = model(src, tgt_in, attention=AttentionWeights([], [], []))
    torch.testing.assert_close(plain, watched, atol=1e-5, rtol=1e-5)
    # Translating with confidence (which runs the forward pass with weights) gives the same
    # translations and scores as without it.
    plain_out = list(translator.translate_lines(SENTENCES, DecodeOptions(beam=2)))
    with_conf = list(translator.translate_lines(SENTENCES, DecodeOptions(beam=2,
                                                                         confidence=True)))
    assert [r.hypotheses for r in plain_out] == [r.hypotheses for r in with_conf]
    assert all(r.confidence is None for r in plain_out)
    assert all(r.confidence is not None for r in with_conf)
    # The cross-attention view decodes the same translation.
    amap = translator.attention(SENTENCES[0], cross=True, beam=2)
    assert amap.translation == translator.tokenizer.decode_tgt(
        [plain_out[0].hypotheses[0].tokens])[0]


# --- words and pieces -------------------------------------------------------------------------


def test_pieces_group_into_whitespace_words():
    pieces = ["▁", "T", "he", "▁ani", "mal", "▁was", "▁tired", ".", "</s>"]
    spans = group_pieces(pieces)
    assert spans == [[0, 1, 2], [3, 4], [5], [6, 7], [8]]
    assert word_labels(pieces, spans) == ["The", "animal", "was", "tired.", "</s>"]
    # The sentence's own words are the labels when they line up with the pieces.
    assert word_labels(pieces, spans, "The animal was tired.") == \
        ["The", "animal", "was", "tired.", "</s>"]


def test_merge_attention_hand_example():
    # Pieces ▁The ▁ani mal ▁sat. </s>: words The, animal (2 pieces), sat., </s>.
    spans = group_pieces(["▁The", "▁ani", "mal", "▁sat.", "</s>"])
    pieces = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0],
                           [0.5, 0.1, 0.1, 0.2, 0.1],
                           [0.1, 0.3, 0.3, 0.1, 0.2],
                           [0.0, 0.0, 1.0, 0.0, 0.0],
                           [0.2, 0.2, 0.2, 0.2, 0.2]])
    # To "animal": columns 1 + 2 summed. From "animal": rows 1 and 2 averaged,
    # ([0.5, 0.2, 0.2, 0.1] + [0.1, 0.6, 0.1, 0.2]) / 2.
    expected = torch.tensor([[0.1, 0.5, 0.4, 0.0],
                             [0.3, 0.4, 0.15, 0.15],
                             [0.0, 1.0, 0.0, 0.0],
                             [0.2, 0.4, 0.2, 0.2]])
    merged = merge_attention(pieces, spans, spans)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(merged.sum(-1), torch.ones(4))
    # Leading (layer, head) dimensions pass through.
    assert merge_attention(pieces.expand(3, 2, 5, 5), spans, spans).shape == (3, 2, 4, 4)


def test_find_word_ignores_case_and_punctuation():
    words = ["The", "animal", "didn't", "cross", "because", "it", "was", "tired.", "</s>"]
    assert find_word(words, "IT") == 5
    assert find_word(words, "tired") == 7
    assert find_word(words, "didnt") == 2
    assert find_word(words, index=1) == 1
    with pytest.raises(TraduireError, match="0:The 1:animal"):
        find_word(words, "street")
    with pytest.raises(TraduireError, match="out of range"):
        find_word(words, index=9)


def test_encoder_attention_map_of_a_sentence(translator):
    amap = translator.attention("The big dog sleeps here.")
    assert amap.rows == amap.cols == ["The", "big", "dog", "sleeps", "here.", "</s>"]
    assert amap.weights.shape == (2, 2, 6, 6)  # layers, heads, words, words
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(2, 2, 6))
    record = amap.row_record(2)
    assert [w for w, _ in record["average"]] == amap.cols
    assert math.isclose(sum(v for _, v in record["average"]), 1.0, abs_tol=1e-4)
    assert len(record["layers"]) == 2 and len(record["layers"][0]["heads"]) == 2


# --- forced decoding ---------------------------------------------------------------------------


def test_score_of_beam_output_equals_beam_logprob(translator):
    tok = translator.tokenizer
    src_ids, _ = translator.encode(SENTENCES)
    hyps = translator.translate_ids(src_ids, DecodeOptions(beam=3, nbest=3))
    pairs = [(s, h) for s, nbest in zip(src_ids, hyps) for h in nbest]
    scores = score_ids(translator.model, tok, [s for s, _ in pairs], [h.tokens for _, h in pairs])
    for (_, h), lps in zip(pairs, scores):
        assert len(lps) == len(h.tokens) + 1
        assert sum(lps) == pytest.approx(h.logprob, abs=1e-4)
        assert lps == pytest.approx(h.token_logprobs, abs=1e-4)
    # Through text: where detokenising and re-encoding gives back the same pieces.
    texts = tok.decode_tgt([h.tokens for _, h in pairs])
    sources = [s for s, nbest in zip(SENTENCES, hyps) for _ in nbest]
    scored = translator.score(sources, texts)
    for (_, h), text, pair in zip(pairs, texts, scored):
        if tok.encode_tgt([text])[0] == h.tokens:
            assert pair.logprob == pytest.approx(h.logprob, abs=1e-4)


def test_score_pairs_figures_agree(translator):
    a, b = translator.score(["the dog runs", "the dog runs"], ["le chien court", "le"])
    assert a.pieces[-1] == "</s>" and len(a.pieces) == len(a.token_logprobs)
    assert a.logprob == pytest.approx(sum(a.token_logprobs))
    assert a.probability == pytest.approx(math.exp(a.logprob))
    assert a.perplexity == pytest.approx(math.exp(-a.logprob / len(a.pieces)))
    record = b.as_record()
    assert record["tokens"][-1][0] == "</s>" and record["logprob"] < 0
    with pytest.raises(TraduireError,
                       match="the source list has 2 lines but the target list has 1"):
        translator.score(["a", "b"], ["c"])


# --- confidence --------------------------------------------------------------------------------


@torch.no_grad()
def coverage_by_word(model, tok, src_ids: list[int], output: list[int]) -> list[float]:
    """The cross-attention each source word received from `output` (and its EOS), summed over
    the output steps and averaged over layers and heads: one sentence alone, one full forward
    pass, words read off the pieces' "▁" marks."""
    attention = AttentionWeights([], [], [])
    model(torch.tensor([src_ids + [tok.eos_id]]), torch.tensor([[tok.bos_id] + output]),
          attention=attention)
    per_piece = torch.stack(attention.decoder_cross)[:, 0].sum(2).mean((0, 1)).tolist()
    words: list[float] = []
    for i, piece_id in enumerate(src_ids):
        if not words or tok.src.id_to_piece(piece_id).startswith("▁"):
            words.append(0.0)
        words[-1] += per_piece[i]
    return words


def test_confidence_counts_the_words_whose_coverage_is_below_the_threshold(translator):
    src_ids, _ = translator.encode(SENTENCES)
    best = [h[0] for h in translator.translate_ids(src_ids, DecodeOptions(beam=2))]
    model, tok = translator.model, translator.tokenizer
    coverages = [coverage_by_word(model, tok, ids, h.tokens) for ids, h in zip(src_ids, best)]
    assert [len(c) for c in coverages] == [len(s.split()) for s in SENTENCES]
    # Thresholds between neighbouring coverages (of any sentence): each one splits the words
    # of each sentence into those below it and those above, with no word near the line.
    values = sorted(c for sentence in coverages for c in sentence)
    thresholds = [(a + b) / 2 for a, b in zip(values, values[1:]) if b - a > 1e-3]
    assert len(thresholds) >= 8
    for threshold in [values[0] / 2, *thresholds, values[-1] + 1]:
        result = confidence(model, tok, src_ids, best, threshold)
        expected = [sum(c < threshold for c in words) / len(words) for words in coverages]
        assert [r["low_attention_share"] for r in result] == pytest.approx(expected, abs=1e-6)
    # Without a threshold, the documented 0.1.
    expected = [sum(c < 0.1 for c in words) / len(words) for words in coverages]
    assert [r["low_attention_share"] for r in confidence(model, tok, src_ids, best)] == \
        pytest.approx(expected, abs=1e-6)
    for conf, hyp in zip(confidence(model, tok, src_ids, best), best):
        assert conf["mean_logprob"] == pytest.approx(
            sum(hyp.token_logprobs) / (len(hyp.tokens) + 1), abs=1e-5)


def test_jsonl_has_confidence_and_flag_below_lists_lines(translator, tmp_path, capsys):
    lines = ["the dog runs", "", "a big red bird sings today", "a cat sleeps"]
    (tmp_path / "in.en").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    translate_file(translator, str(tmp_path / "in.en"), out, DecodeOptions(beam=2),
                   format="jsonl", progress=False)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert set(records[0]["confidence"]) == {"mean_logprob", "low_attention_share"}
    assert "confidence" not in records[1]  # an empty line is not translated
    confidences = {number: r["confidence"]["mean_logprob"]
                   for number, r in enumerate(records, 1) if "confidence" in r}
    assert len(set(confidences.values())) == 3
    # A threshold between the least and the second least confident line flags the first only;
    # one between the second and the third flags both; a line exactly at the threshold is not
    # below it.
    ranked = sorted(confidences, key=confidences.get)
    low, middle = confidences[ranked[0]], confidences[ranked[1]]
    high = confidences[ranked[2]]
    for threshold, expected in (((low + middle) / 2, [ranked[0]]),
                                ((middle + high) / 2, sorted(ranked[:2])),
                                (middle, [ranked[0]])):
        capsys.readouterr()
        stats = translate_file(translator, str(tmp_path / "in.en"), tmp_path / "out.txt",
                               DecodeOptions(beam=2), progress=False, flag_below=threshold)
        assert stats["flagged"] == expected
        assert (f"{len(expected)} lines with mean token log-probability below {threshold}: "
                f"{' '.join(map(str, expected))}") in capsys.readouterr().err
    # The flag does not change the translations.
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines() == \
        [r.get("translation", "") for r in records]
