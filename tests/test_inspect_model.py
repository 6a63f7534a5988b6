"""Tests for traduire.inspect_model and the commands on it: attention, score, info, confidence."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_settings, write_corpus
from traduire.cli import app
from traduire.config import MODEL_PRESETS, config_from_dict, load_config
from traduire.errors import TraduireError
from traduire.inspect_model import (
    LOW_ATTENTION_THRESHOLD,
    attention_map,
    confidence,
    find_word,
    group_pieces,
    merge_attention,
    parameter_counts,
    plot_attention,
    score_ids,
    score_pairs,
    word_labels,
)
from traduire.model import Attention, Transformer, TransformerShape
from traduire.search import Hypothesis
from traduire.translate import (
    DecodeOptions,
    Translation,
    Translator,
    format_probabilities,
    translate_file,
)

SENTENCES = ["the big dog sleeps here", "a cat runs", "the small red bird sings today"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run trained for 10 steps (2 layers, d_model 32): enough to exercise every path."""
    from traduire.pipeline import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inspect")
    settings = tiny_settings(write_corpus(root / "data"), model={"layers": 2},
                             train={"max_steps": 10, "save_every": 10, "valid_every": 10})
    run(config_from_dict(settings), root / "run")
    torch.set_num_threads(before)
    return root / "run"


@pytest.fixture(scope="module")
def translator(run_dir) -> Translator:
    # fp32: these tests compare scores across code paths to 1e-4.
    return Translator.load(run_dir, device="cpu", precision="fp32")


# --- the model's attention weights -------------------------------------------------------------


def test_attention_rows_sum_to_one_and_respect_masks():
    torch.manual_seed(0)
    model = Transformer(TransformerShape(src_vocab_size=20, tgt_vocab_size=20, d_model=16,
                                         heads=2, ffn_dim=32, encoder_layers=2,
                                         decoder_layers=2, max_positions=32)).eval()
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]])  # second row: two pads
    tgt_in = torch.tensor([[2, 9, 10], [2, 11, 12]])
    attention = Attention([], [], [])
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
        watched = model(src, tgt_in, attention=Attention([], [], []))
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
    amap = attention_map(translator, SENTENCES[0], cross=True, beam=2)
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
    amap = attention_map(translator, "The big dog sleeps here.")
    assert amap.rows == amap.cols == ["The", "big", "dog", "sleeps", "here.", "</s>"]
    assert amap.weights.shape == (2, 2, 6, 6)  # layers, heads, words, words
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(2, 2, 6))
    record = amap.row_record(2)
    assert [w for w, _ in record["average"]] == amap.cols
    assert math.isclose(sum(v for _, v in record["average"]), 1.0, abs_tol=1e-4)
    assert len(record["layers"]) == 2 and len(record["layers"][0]["heads"]) == 2


def test_plot_writes_a_png(translator, tmp_path):
    pytest.importorskip("matplotlib")
    amap = attention_map(translator, "the dog runs")
    plot_attention(amap, tmp_path / "layers.png")
    plot_attention(attention_map(translator, "the dog runs", cross=True, beam=2),
                   tmp_path / "heads.png", panels="heads", layer=0)
    for name in ("layers.png", "heads.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_one_line_error(translator, tmp_path, monkeypatch):
    import sys

    amap = attention_map(translator, "the dog runs")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(TraduireError, match=r"--plot needs matplotlib"):
        plot_attention(amap, tmp_path / "x.png")


# --- forced decoding ---------------------------------------------------------------------------


def test_score_of_beam_output_equals_beam_logprob(translator):
    tok = translator.tokenizer
    src_ids, _ = translator.encode(SENTENCES)
    hyps = translator.translate_ids(src_ids, DecodeOptions(beam=3, nbest=3))
    pairs = [(s, h) for s, nbest in zip(src_ids, hyps) for h in nbest]
    scores = score_ids(translator, [s for s, _ in pairs], [h.tokens for _, h in pairs])
    for (_, h), lps in zip(pairs, scores):
        assert len(lps) == len(h.tokens) + 1
        assert sum(lps) == pytest.approx(h.logprob, abs=1e-4)
        assert lps == pytest.approx(h.token_logprobs, abs=1e-4)
    # Through text: where detokenising and re-encoding gives back the same pieces.
    texts = tok.decode_tgt([h.tokens for _, h in pairs])
    sources = [s for s, nbest in zip(SENTENCES, hyps) for _ in nbest]
    scored = score_pairs(translator, sources, texts)
    for (_, h), text, pair in zip(pairs, texts, scored):
        if tok.encode_tgt([text])[0] == h.tokens:
            assert pair.logprob == pytest.approx(h.logprob, abs=1e-4)


def test_score_pairs_figures_agree(translator):
    a, b = score_pairs(translator, ["the dog runs", "the dog runs"], ["le chien court", "le"])
    assert a.pieces[-1] == "</s>" and len(a.pieces) == len(a.token_logprobs)
    assert a.logprob == pytest.approx(sum(a.token_logprobs))
    assert a.probability == pytest.approx(math.exp(a.logprob))
    assert a.perplexity == pytest.approx(math.exp(-a.logprob / len(a.pieces)))
    record = b.as_record()
    assert record["tokens"][-1][0] == "</s>" and record["logprob"] < 0
    with pytest.raises(TraduireError, match="2 source lines but 1 target lines"):
        score_pairs(translator, ["a", "b"], ["c"])


# --- confidence --------------------------------------------------------------------------------


def test_confidence_definitions(translator):
    src_ids, _ = translator.encode(SENTENCES)
    best = [h[0] for h in translator.translate_ids(src_ids, DecodeOptions(beam=2))]
    result = confidence(translator, src_ids, best)
    for conf, hyp in zip(result, best):
        assert conf["mean_logprob"] == pytest.approx(
            sum(hyp.token_logprobs) / (len(hyp.tokens) + 1), abs=1e-5)
        assert 0.0 <= conf["low_attention_share"] <= 1.0
    # Coverage is >= 0, so a zero threshold flags nothing; a huge one flags every word.
    assert all(c["low_attention_share"] == 0 for c in confidence(translator, src_ids, best, 0.0))
    assert all(c["low_attention_share"] == 1 for c in confidence(translator, src_ids, best, 1e9))
    assert LOW_ATTENTION_THRESHOLD == 0.1


def test_jsonl_has_confidence_and_flag_below_lists_lines(translator, tmp_path, capsys):
    (tmp_path / "in.en").write_text("the dog runs\n\na cat sleeps\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    stats = translate_file(translator, str(tmp_path / "in.en"), out, DecodeOptions(beam=2),
                           format="jsonl", progress=False, flag_below=0.0)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert set(records[0]["confidence"]) == {"mean_logprob", "low_attention_share"}
    assert "confidence" not in records[1]  # an empty line is not translated
    assert stats["flagged"] == [1, 3]  # every log-probability is below 0
    assert "2 lines with mean token log-probability below 0.0: 1 3" in capsys.readouterr().err


def test_probability_table_reads_like_a_textbook():
    def hyp(p: float) -> Hypothesis:
        return Hypothesis([5], math.log(p), math.log(p), [math.log(p)])

    result = Translation("I am a good dog.", [hyp(0.42), hyp(0.031), hyp(0.0001), hyp(1.0)],
                         ["Je suis un bon chien.", "Je suis un chien sage.", "Chien.", "Oui."])
    assert format_probabilities(result).splitlines() == [
        "  I am a good dog.",
        "   42.0%  Je suis un bon chien.",
        "    3.1%  Je suis un chien sage.",
        "1.0e-02%  Chien.",
        "  100.0%  Oui.",
    ]


# --- model size and presets --------------------------------------------------------------------


def formula_parameters(vocab: int, layers: int, d: int, ffn: int) -> int:
    """Weights and biases of our pre-norm Transformer with one tied embedding matrix."""
    attention = 4 * d * d + 4 * d  # q, k, v and output projections
    feed_forward = 2 * d * ffn + ffn + d
    norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm
    return vocab * d + layers * (encoder_layer + decoder_layer) + 2 * norm  # + final norms


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "big"])
def test_presets_have_the_documented_parameter_counts(preset):
    values = MODEL_PRESETS[preset]
    config = config_from_dict({"data": {"dir": "x"}, "model": {"preset": preset},
                               "tokenizer": {"vocab_size": 37000}})
    assert config.model.d_model == values["d_model"] and config.model.layers == values["layers"]
    from traduire.inspect_model import model_shape

    counts = parameter_counts(model_shape(config, 37000, 37000, 0))
    assert counts["total"] == formula_parameters(37000, values["layers"], values["d_model"],
                                                 values["ffn_dim"])
    assert counts["embeddings"] + counts["encoder"] + counts["decoder"] == counts["total"]


def test_base_and_big_come_close_to_the_paper():
    # Vaswani et al. (2017), Table 3: base 65M and big 213M parameters with a 37k shared
    # vocabulary. With tied embeddings and 37000 pieces we count 63.1M (-3%) and 214.2M
    # (+0.6%); the paper does not say exactly what its figures include.
    assert formula_parameters(37000, 6, 512, 2048) == 63_084_544
    assert formula_parameters(37000, 6, 1024, 4096) == 214_249_472


def test_preset_values_yield_to_explicit_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {dir: x}\nmodel: {preset: big, dropout: 0.2, layers: 2}\n")
    model = load_config(path).model
    assert (model.layers, model.d_model, model.heads, model.ffn_dim, model.dropout) == \
        (2, 1024, 16, 4096, 0.2)
    assert load_config(path, ["model.preset=tiny"]).model.d_model == 64
    with pytest.raises(TraduireError, match="model.preset"):
        load_config(path, ["model.preset=huge"])


# --- command line ------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_attention_table_json_and_errors(run_dir):
    sentence = "The big dog sleeps here."
    table = invoke("attention", "--run-dir", str(run_dir), sentence, "--token", "DOG")
    assert table.exit_code == 0, table.output
    assert "encoder self-attention from 'dog'" in table.output
    assert "layer 2 head 2:" in table.output and "█" in table.output
    as_json = invoke("attention", "-r", str(run_dir), sentence, "--index", "4", "--json")
    record = json.loads(as_json.stdout)
    assert record["word"] == "here."
    assert [w for w, _ in record["average"]] == ["The", "big", "dog", "sleeps", "here.", "</s>"]
    assert sum(v for _, v in record["average"]) == pytest.approx(1.0, abs=1e-4)
    cross = invoke("attention", "-r", str(run_dir), sentence, "--cross", "--json",
                   "--beam", "2")
    assert cross.exit_code == 0 and "alignment" in json.loads(cross.stdout)
    missing = invoke("attention", "-r", str(run_dir), sentence, "--token", "street")
    assert missing.exit_code == 1
    assert "0:The 1:big 2:dog 3:sleeps 4:here. 5:</s>" in missing.output


def test_cli_score(run_dir, tmp_path):
    (tmp_path / "a.en").write_text("the dog runs\nthe dog runs\n", encoding="utf-8")
    (tmp_path / "a.fr").write_text("le chien court\nle chat court\n", encoding="utf-8")
    args = ["score", "-r", str(run_dir), "--src", str(tmp_path / "a.en"),
            "--tgt", str(tmp_path / "a.fr")]
    text = invoke(*args)
    assert text.exit_code == 0 and "logprob" in text.output and "</s>:" in text.output
    pairs = json.loads(invoke(*args, "--json").stdout)["pairs"]
    assert [p["target"] for p in pairs] == ["le chien court", "le chat court"]
    (tmp_path / "b.fr").write_text("le chien court\n", encoding="utf-8")
    short = invoke("score", "-r", str(run_dir), "--src", str(tmp_path / "a.en"),
                   "--tgt", str(tmp_path / "b.fr"))
    assert short.exit_code == 1 and "has 2 lines but" in short.output


def test_cli_info(run_dir, tmp_path):
    result = invoke("info", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "2+2 layers, d_model 32" in result.output
    assert "training: step 10" in result.output and "data: train" in result.output
    record = json.loads(invoke("info", "-r", str(run_dir), "--json").stdout)
    assert record["train_state"]["step"] == 10 and record["data"]["train"]["read"] == 200
    assert record["parameters"]["total"] == sum(
        p.numel() for p in Translator.load(run_dir, device="cpu").model.parameters())
    config = tmp_path / "base.yaml"
    config.write_text("data: {dir: x}\nmodel: {preset: base}\ntokenizer: {vocab_size: 37000}\n")
    base = invoke("info", "--config", str(config), "--json")
    assert json.loads(base.stdout)["parameters"]["total"] == 63_084_544


def test_confidence_vs_chrf_script_runs(run_dir, tmp_path, capsys):
    path = Path(__file__).parents[1] / "scripts" / "confidence_vs_chrf.py"
    spec = importlib.util.spec_from_file_location("confidence_vs_chrf", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # Hand-checked ranks and correlation.
    assert script.ranks(script.np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1, 3.5, 2]
    assert script.spearman(script.np.array([1.0, 2, 3]), script.np.array([10.0, 20, 30])) == 1.0
    (tmp_path / "t.en").write_text("\n".join(SENTENCES * 4) + "\n", encoding="utf-8")
    (tmp_path / "t.fr").write_text("le grand chien\n" * 12, encoding="utf-8")
    summary = script.main([str(run_dir), str(tmp_path / "t.en"), str(tmp_path / "t.fr"),
                           "--beam", "1", "--device", "cpu"])
    assert summary["sentences"] == 12 and summary["low_decile"] == 1
    assert "Spearman rank correlation" in capsys.readouterr().out
