"""Tests for traduire.translate's choice of decoding precision (the rest of translate is tested
through the CLI in test_evaluate, test_bad_input and test_fuzz)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from typer.testing import CliRunner

from traduire import device
from traduire.analysis import score_ids
from traduire.cli import app
from traduire.device import decoding_precision
from traduire.errors import TraduireError
from traduire.search import Hypothesis
from traduire.translate import DecodeOptions, Translation, Translator
from traduire.translate_files import translate_file
from traduire.translate_output import format_probabilities

CPU = torch.device("cpu")
SOURCES = ["the dog runs", "a man in a red shirt", "", "two children play in the water"]


def test_explicit_precisions() -> None:
    assert decoding_precision("fp32", CPU) == "fp32"
    assert decoding_precision("bf16", CPU) == "bf16"
    with pytest.raises(TraduireError, match="expected one of auto, fp32, bf16"):
        decoding_precision("fp16", CPU)


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected) -> None:
    monkeypatch.setattr(device, "native_bf16", lambda device: native)
    assert decoding_precision("auto", CPU) == expected


def test_bf16_scores_are_the_fp32_model_scores_within_rounding(small_run) -> None:
    """The bf16 translator's best hypotheses, rescored by the fp32 model: the log-probabilities
    agree to bf16 rounding (search scores are computed in fp32 from the bf16 logits)."""
    run_dir = small_run[1]
    bf16 = Translator.load(run_dir, device="cpu", precision="bf16")
    fp32 = Translator.load(run_dir, device="cpu", precision="fp32")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    results = list(bf16.translate_lines(SOURCES, DecodeOptions(beam=3)))
    assert len(results) == len(SOURCES)
    pairs = [(ids, r.hypotheses[0]) for ids, r in zip(bf16.encode(SOURCES)[0], results)
             if r.hypotheses]
    rescored = score_ids(fp32.model, fp32.tokenizer, [ids for ids, _ in pairs],
                         [h.tokens for _, h in pairs])
    for (_, hyp), logprobs in zip(pairs, rescored):
        assert sum(logprobs) == pytest.approx(hyp.logprob, abs=0.05 * len(logprobs))


def test_cli_precision(small_run, tmp_path) -> None:
    source = tmp_path / "in.en"
    source.write_text("\n".join(SOURCES) + "\n")
    out = tmp_path / "out.fr"
    args = ["translate", str(source), "-r", str(small_run[1]), "-o", str(out), "-q"]
    result = CliRunner().invoke(app, [*args, "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == len(SOURCES)
    result = CliRunner().invoke(app, [*args, "--precision", "half"])
    assert result.exit_code != 0
    assert "precision 'half': expected one of auto, fp32, bf16" in result.output


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


# --- output limits -----------------------------------------------------------------------------


def test_a_sentence_output_limit_depends_on_itself_not_on_its_neighbours(small_run, tmp_path):
    """One line longer than the model's positions among short ones: each short line gets
    the same translation (and never more tokens than its own limit) whatever batch it is in."""
    translator = Translator.load(small_run[1], device="cpu", precision="fp32")
    short = ["the dog runs", "a big cat sleeps here now", "the bird", "a horse eats today"]
    very_long = " ".join(["the small red bird sings"] * 30)  # cut to the model's 31 tokens
    options = dict(beam=2, max_len_a=1.0, max_len_b=0)  # a limit that bites at every length
    alone = [translator.translate([line], **options)[0] for line in short]
    limits = [len(ids) + 1 for ids in translator.encode(short)[0]]  # int(1.0 * n + 0)
    for hyps, limit in zip(translator.translate_ids(translator.encode(short)[0],
                                                    DecodeOptions(**options)), limits):
        assert len(hyps[0].tokens) <= limit
    lines = short[:2] + [very_long] + short[2:]
    for batch_size in (1, 2, 3, 5):
        together = translator.translate(lines, batch_size=batch_size, **options)
        assert together[:2] + together[3:] == alone, batch_size
    (tmp_path / "in.en").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.fr"
    translate_file(translator, str(tmp_path / "in.en"), out, DecodeOptions(**options),
                   progress=False)
    written = out.read_text(encoding="utf-8").split("\n")
    assert written[:2] + written[3:5] == alone and written[5:] == [""]


# --- the Python API ----------------------------------------------------------------------------


def test_the_python_api_translates_scores_and_shows_attention(small_run):
    import traduire

    t = traduire.Translator.load(small_run[1])
    assert t is not None and traduire.Translator is Translator
    best = t.translate(["the dog runs", "", "a cat sleeps"])
    assert len(best) == 3 and all(isinstance(s, str) for s in best) and best[1] == ""
    assert t.translate("the dog runs") == best[:1]
    nbest = t.translate(["the dog runs"], beam=4, nbest=3)[0]
    assert len(nbest) == 3 and nbest[0].text == best[0]
    assert [c.score for c in nbest] == sorted((c.score for c in nbest), reverse=True)
    for candidate in nbest:
        assert candidate.probability == pytest.approx(math.exp(candidate.logprob))
    scored = t.score(["the dog runs"], [best[0]])[0]
    assert scored.target == best[0] and scored.logprob <= 0
    row = t.attention("the dog runs", token="dog")
    assert row["word"] == "dog" and [w for w, _ in row["average"]] == ["the", "dog", "runs",
                                                                        "</s>"]
    assert sum(weight for _, weight in row["average"]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(TraduireError, match="--nbest 3 cannot exceed --beam 2"):
        t.translate(["x"], beam=2, nbest=3)


def test_training_from_python(tmp_path, tiny_config_path):
    import traduire

    state = traduire.train(tiny_config_path, tmp_path / "run", overrides=["train.max_steps=3"])
    assert state.step == 3
    assert traduire.train(tiny_config_path, tmp_path / "run",
                          overrides=["train.max_steps=5"]).step == 5


# --- int8 decoding -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """The toy corpus learned well enough (200 steps) that its translations mean something."""
    from conftest import tiny_settings, write_corpus
    from traduire.config import config_from_dict
    from traduire.pipeline import run

    root = tmp_path_factory.mktemp("learned")
    settings = tiny_settings(write_corpus(root / "data"), model={"dropout": 0.0},
                             train={"max_steps": 200, "save_every": 200, "valid_every": 200,
                                    "lr": 0.005, "batch_tokens": 512})
    run(config_from_dict(settings), root / "run")
    return root / "run"


def test_int8_decoding_translates_like_fp32(learned_run):
    from conftest import make_pair

    rng = random.Random(7)
    sources = [make_pair(rng)[0] for _ in range(30)]
    fp32 = Translator.load(learned_run, device="cpu", precision="fp32")
    int8 = Translator.load(learned_run, device="cpu", precision="int8")
    quantized = torch.ao.nn.quantized.dynamic.Linear
    linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear | quantized)]
    assert linears and all(isinstance(m, quantized) for m in linears)
    assert isinstance(int8.model.int8_projection, quantized)
    expected, got = fp32.translate(sources, beam=3), int8.translate(sources, beam=3)
    assert sum(a == b for a, b in zip(expected, got)) >= 0.8 * len(sources)
    assert sum(len(t.split()) for t in expected) > 2 * len(sources)  # it learned something
    # int8's best hypotheses, rescored by the fp32 model: the same log-probabilities to within
    # the quantisation error (0.05 per token here).
    ids = int8.encode(sources)[0]
    hyps = [h[0] for h in int8.translate_ids(ids, DecodeOptions(beam=3))]
    rescored = score_ids(fp32.model, fp32.tokenizer, ids, [h.tokens for h in hyps])
    for hyp, logprobs in zip(hyps, rescored):
        assert sum(logprobs) == pytest.approx(hyp.logprob, abs=0.05 * len(logprobs))


def test_int8_is_refused_on_a_gpu_and_auto_never_picks_an_emulated_precision(monkeypatch):
    with pytest.raises(TraduireError, match="int8' decodes on CPUs only"):
        decoding_precision("int8", torch.device("cuda"))
    monkeypatch.setattr(device, "native_bf16", lambda device: False)
    assert decoding_precision("auto", CPU) == "fp32"


BATCHINGS = {"1": dict(batch_size=1), "16": dict(batch_size=16), "64": dict(batch_size=64),
             "4000 tokens": dict(batch_tokens=4000)}


def test_translations_do_not_depend_on_the_batch(learned_run) -> None:
    """In fp32 a sentence translates the same alone, in batches of 16 or 64, in batches of
    4,000 tokens, and with the lines shuffled, exactly. (Not so in int8: torch quantises a
    batch's activations with one scale. scripts/bench/batch_invariance.py measures the
    shares on Multi30k in fp32, bf16 and int8.)"""
    from conftest import toy_sentences

    translator = Translator.load(learned_run, device="cpu", precision="fp32")
    lines = toy_sentences()
    outputs = {name: [r.best for r in translator.translate_lines(
        lines, DecodeOptions(beam=4, **batching))] for name, batching in BATCHINGS.items()}
    order = list(range(len(lines)))
    random.Random(3).shuffle(order)
    shuffled = [r.best for r in translator.translate_lines(
        [lines[i] for i in order], DecodeOptions(beam=4, batch_size=16))]
    outputs["shuffled"] = [shuffled[order.index(i)] for i in range(len(lines))]
    assert len({tuple(o) for o in outputs.values()}) == 1, {
        name: sum(a != b for a, b in zip(o, outputs["1"])) for name, o in outputs.items()}
    assert len(set(outputs["1"])) > 20  # the sentences translate differently
