"""Tests for traduire.export: a CTranslate2 export is the same model, and searches alike."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import toy_sentences
from traduire.cli import app
from traduire.translate import DecodeOptions, Translator

ctranslate2 = pytest.importorskip("ctranslate2")

from traduire.analysis import score_ids  # noqa: E402
from traduire.batch import output_limits, source_batch  # noqa: E402
from traduire.ctranslate2_engine import CTranslate2Engine  # noqa: E402
from traduire.export import export_ctranslate2  # noqa: E402
from traduire.model import Transformer  # noqa: E402
from traduire.search import beam_search  # noqa: E402

SOURCES = ["the dog runs", "a man in a red shirt sits on a bench", "", "two children",
           "people walk down the street at night", "a"]


def random_variant(base: Translator, norm: str, activation: str) -> Translator:
    """The trained run's tokenizer with a random model of another shape."""
    torch.manual_seed(0)
    shape = dataclasses.replace(base.model.shape, norm=norm, activation=activation,
                                encoder_layers=2, decoder_layers=1)
    model = Transformer(shape).eval()
    with torch.no_grad():  # non-zero norm biases, so that exporting them is tested too
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0.0, 0.1)
    return Translator(model, base.tokenizer, base.config, base.device, base.checkpoint)


@pytest.fixture(scope="module")
def base(small_run) -> Translator:
    return Translator.load(small_run[1], device="cpu", precision="fp32")


@pytest.mark.parametrize(("norm", "activation"), [("pre", "relu"), ("post", "gelu")])
def test_exported_model_scores_like_the_original(base, tmp_path, norm, activation):
    """Forced decoding of random targets: CTranslate2's per-token log-probabilities equal
    traduire's, so every weight, norm, position and the tied projection went across."""
    translator = random_variant(base, norm, activation)
    export_ctranslate2(translator, tmp_path / "ct2")
    engine = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", intra_threads=1)
    tok = translator.tokenizer
    src_ids = [ids[:20] for ids in tok.encode_src([s for s in SOURCES if s])]
    gen = torch.Generator().manual_seed(1)
    tgt_ids = [torch.randint(4, tok.tgt_vocab_size, (n,), generator=gen).tolist()
               for n in (3, 9, 1, 6, 12)]
    ours = score_ids(translator.model, translator.tokenizer, src_ids, tgt_ids)
    theirs = engine.score_batch([tok.tgt_pieces(ids) for ids in src_ids],
                                [tok.tgt_pieces(ids) for ids in tgt_ids])
    for mine, other in zip(ours, theirs, strict=True):
        assert other.log_probs == pytest.approx(mine, abs=1e-4)  # target tokens, then EOS


def searching_with_ctranslate2(translator: Translator, model_dir) -> Translator:
    """`translator` with its search in CTranslate2 on the model exported to `model_dir`."""
    engine = CTranslate2Engine(
        ctranslate2.Translator(str(model_dir), device="cpu", intra_threads=1),
        translator.tokenizer, translator.model.shape.max_positions, "default")
    return Translator(translator.model, translator.tokenizer, translator.config,
                      translator.device, translator.checkpoint, engine)


@pytest.mark.parametrize(("norm", "activation"), [("pre", "relu"), ("post", "gelu")])
def test_ctranslate2_greedy_search_equals_traduire_greedy(base, tmp_path, norm, activation):
    translator = random_variant(base, norm, activation)
    export_ctranslate2(translator, tmp_path / "ct2")
    ct2 = searching_with_ctranslate2(translator, tmp_path / "ct2")
    options = DecodeOptions(beam=1, lenpen=0.0, max_len_a=0.0, max_len_b=12)
    ours = list(translator.translate_lines(SOURCES, options))
    theirs = list(ct2.translate_lines(SOURCES, options))
    assert sum(len(r.hypotheses[0].tokens) for r in ours if r.hypotheses) > len(SOURCES)
    for mine, other in zip(ours, theirs, strict=True):
        assert [h.tokens for h in mine.hypotheses] == [h.tokens for h in other.hypotheses]
        assert mine.texts == other.texts


class Renormalised:
    """A model whose next-token distribution leaves out BOS and padding before normalising,
    as CTranslate2's suppress_sequences does (traduire's search removes them after: its
    log-probabilities are the model's own)."""

    def __init__(self, model: Transformer, never: list[int]) -> None:
        self.model, self.shape, self.never = model, model.shape, never

    def encode(self, src):
        return self.model.encode(src)

    def new_cache(self):
        return self.model.new_cache()

    def decode(self, *args):
        logits = self.model.decode(*args).clone()
        logits[..., self.never] = float("-inf")
        return logits


@pytest.mark.parametrize("step", [60, 120])
def test_ctranslate2_beam_search_is_traduires_on_the_renormalised_distribution(
        learned_run, tmp_path, step):
    """--lenpen 0, beam 5: CTranslate2's best translation of every sentence is the one
    traduire's beam search finds when BOS and padding are left out before normalising, unless
    CTranslate2's reaches the length limit, where it ends without EOS (the README says so)."""
    translator = Translator.load(learned_run, learned_run / "checkpoints" / f"step_{step:08d}.pt",
                                 device="cpu", precision="fp32")
    export_ctranslate2(translator, tmp_path / "ct2")
    ct2 = searching_with_ctranslate2(translator, tmp_path / "ct2")
    tok = translator.tokenizer
    src_ids, _ = translator.encode(toy_sentences())
    src = source_batch(src_ids, pad=tok.pad_id, eos=tok.eos_id)
    limits = output_limits(src, tok.pad_id, 1.2, 10, translator.model.shape.max_positions)
    special = dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, lenpen=0.0)
    renormalised = Renormalised(translator.model, [tok.bos_id, tok.pad_id])
    expected = beam_search(renormalised, src, beam=5, **special)
    theirs = ct2.translate_ids(src_ids, DecodeOptions(beam=5, lenpen=0.0))
    compared = 0
    for mine, other, limit in zip(expected, theirs, limits.tolist(), strict=True):
        if len(other[0].tokens) == limit:
            continue  # CTranslate2 went on to the batch's limit without EOS, and was cut
        assert other[0].tokens == mine[0].tokens
        assert other[0].logprob == pytest.approx(mine[0].logprob, abs=1e-4)
        compared += 1
    assert compared > 0.9 * len(src_ids)
    # What makes this a test of beam search: at step 60 the best translation is often empty
    # (CTranslate2 must be allowed to end at once), at step 120 beam 5 and greedy differ.
    ours = beam_search(translator.model, src, beam=5, **special)
    greedy = beam_search(translator.model, src, beam=1, **special)
    if step == 60:
        assert sum(not hyps[0].tokens for hyps in ours) > 10
    else:
        assert sum(a[0].tokens != b[0].tokens for a, b in zip(ours, greedy)) > 3


def test_cli_export_then_translate(small_run, tmp_path):
    run_dir = small_run[1]
    runner = CliRunner()
    target = tmp_path / "ct2"
    result = runner.invoke(app, ["export", "-r", str(run_dir), "-o", str(target),
                                 "--quantization", "int8"])
    assert result.exit_code == 0, result.output
    assert (target / "model.bin").is_file()
    again = runner.invoke(app, ["export", "-r", str(run_dir), "-o", str(target)])
    assert again.exit_code != 0 and "already exists (use --force" in again.output
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    refused = runner.invoke(app, ["export", "-r", str(run_dir), "-o", str(notes), "--force"])
    assert refused.exit_code != 0 and "not replacing it" in refused.output
    assert (notes / "mine.txt").read_text() == "keep me"

    source = tmp_path / "in.en"
    source.write_text("\n".join(SOURCES) + "\n\n")
    out = tmp_path / "out.fr"
    missing = runner.invoke(app, ["translate", str(source), "-r", str(run_dir), "-o", str(out),
                                  "--engine", "ctranslate2"])
    assert missing.exit_code != 0 and "traduire export --run-dir" in missing.output
    assert not out.exists()

    # The run's own export location, where --engine ctranslate2 looks.
    result = runner.invoke(app, ["export", "-r", str(run_dir)])
    assert result.exit_code == 0, result.output
    try:
        result = runner.invoke(app, ["translate", str(source), "-r", str(run_dir), "-o",
                                     str(out), "--engine", "ctranslate2", "-q"])
        assert result.exit_code == 0, result.output
        lines = out.read_text().split("\n")
        assert len(lines) == len(SOURCES) + 2  # one per input line, and the final newline
        assert lines[2] == "" and lines[-2] == ""
        # jsonl carries a confidence, which needs only each hypothesis's total logprob.
        result = runner.invoke(app, ["translate", str(source), "-r", str(run_dir), "-o",
                                     str(out), "--engine", "ctranslate2", "-q", "-f", "jsonl"])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == len(SOURCES) + 1
        assert all("confidence" in r for r in records if r["source"].strip())
        (run_dir / "ctranslate2" / "model.bin").write_bytes(b"not a model")
        broken = runner.invoke(app, ["translate", str(source), "-r", str(run_dir),
                                     "--engine", "ctranslate2", "-q"])
        assert broken.exit_code != 0
        assert "CTranslate2 cannot load this model" in broken.output
        assert "Traceback" not in broken.output
    finally:
        import shutil

        shutil.rmtree(run_dir / "ctranslate2")  # the shared run must stay as it was
    result = runner.invoke(app, ["translate", str(source), "-r", str(run_dir), "-o", str(out),
                                 "--engine", "ctranslate2", "--engine-dir", str(target), "-q"])
    assert result.exit_code == 0, result.output  # the int8 export
    assert len(out.read_text().split("\n")) == len(SOURCES) + 2
    bad = runner.invoke(app, ["translate", str(source), "-r", str(run_dir), "--engine", "onnx"])
    assert bad.exit_code != 0 and "--engine 'onnx': expected torch or ctranslate2" in bad.output
