"""sacreBLEU scoring: the same numbers as sacreBLEU's own command line, signatures, and the
`eval` command on files and on a trained run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from traduire.cli import app
from traduire.errors import DataError
from traduire.evaluate import score
from traduire.files import read_text_lines as read_text

HYPOTHESES = ["Un homme fait du vélo dans la rue.", "Deux chiens jouent dans la neige.",
              "Une femme lit un livre sur un banc.", "Des enfants courent sur la plage !"]
REFERENCES = ["Un homme fait du vélo dans une rue.", "Deux chiens jouent dans la neige.",
              "Une femme assise sur un banc lit un livre.", "Des enfants courent sur la plage."]


@pytest.fixture
def files(tmp_path):
    hyp, ref = tmp_path / "hyp.fr", tmp_path / "ref.fr"
    hyp.write_text("\n".join(HYPOTHESES) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    return hyp, ref


def sacrebleu_cli(hyp, ref, metric: str) -> float:
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m",
                          metric, "-b", "-w", "2"], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_scores_equal_sacrebleus_own_command_line(files):
    hyp, ref = files
    result = score(read_text(hyp), read_text(ref))
    assert result["bleu"] == sacrebleu_cli(hyp, ref, "bleu")
    assert result["chrf"] == sacrebleu_cli(hyp, ref, "chrf")
    assert 0 < result["bleu"] < 100  # neither trivially perfect nor empty
    assert result["signature"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_line_count_mismatch_names_both_counts(files):
    hyp, ref = files
    with pytest.raises(DataError,
                       match="the hypothesis list has 3 lines but the reference list has 4"):
        score(read_text(hyp)[:3], read_text(ref))
    ref.write_text("\n".join(REFERENCES[:3]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "--hyp", str(hyp), "--ref", str(ref)])
    assert result.exit_code == 1
    assert "has 4 lines" in result.output and "has 3" in result.output


def test_eval_json_has_bleu_chrf_and_signature(files):
    hyp, ref = files
    result = CliRunner().invoke(app, ["eval", "--hyp", str(hyp), "--ref", str(ref), "--json",
                                      "--ter"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {"bleu", "chrf", "signature", "ter"} <= set(record)
    assert record["bleu"] == sacrebleu_cli(hyp, ref, "bleu")


def test_eval_translates_then_scores_without_printing_the_translations(tmp_path,
                                                                       tiny_config_path):
    from traduire.config import load_config
    from traduire.pipeline import run

    run_dir = tmp_path / "run"
    run(load_config(tiny_config_path, ["train.max_steps=5"]), run_dir)
    src, ref = tmp_path / "src.en", tmp_path / "ref.fr"
    src.write_text("the dog runs\na cat sleeps\n", encoding="utf-8")
    ref.write_text("le chien court\nun chat dort\n", encoding="utf-8")
    out = tmp_path / "hyp.fr"
    result = CliRunner().invoke(app, ["eval", "-r", str(run_dir), "--src", str(src), "--ref",
                                      str(ref), "--json", "--beam", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # stdout is the JSON object alone
    assert record["speed"]["sentences"] == 2
    assert len(read_text(out)) == 2


# --- validation BLEU ---------------------------------------------------------------------------


def test_validation_bleu_translates_with_greedy_search_at_beam_one(learned_run):
    """valid_beam 1 is exactly search.greedy, sentence by sentence; a wider beam is beam search
    with translate's defaults; the BLEU is sacreBLEU's on those translations."""
    import datasets

    from conftest import toy_sentences
    from traduire.batch import EncodedCorpus, source_batch
    from traduire.evaluate import validate_bleu, validation_translations
    from traduire.search import beam_search, greedy
    from traduire.translate import Translator

    translator = Translator.load(learned_run, device="cpu", precision="fp32")
    model, tok = translator.model, translator.tokenizer
    sources = toy_sentences()
    src_ids = tok.encode_src(sources)
    special = dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)

    def alone(search) -> list[str]:
        return [tok.decode_tgt([search(source_batch([ids], pad=tok.pad_id, eos=tok.eos_id))
                                .tokens])[0] for ids in src_ids]

    greedy_texts = alone(lambda src: greedy(model, src, **special)[0])
    beam_texts = alone(lambda src: beam_search(model, src, beam=3, **special)[0][0])
    differ = [i for i, (g, b) in enumerate(zip(greedy_texts, beam_texts)) if g != b]
    assert len(differ) >= 2
    # References: the greedy translation where the two differ, else a sentence of its own.
    references = [greedy_texts[i] if i in differ else "le chat dort" for i in range(len(sources))]
    data = EncodedCorpus(datasets.Dataset.from_dict({
        "src_ids": src_ids, "tgt_ids": tok.encode_tgt(references),
        "src_len": [len(s) for s in src_ids],
        "tgt_len": [len(t) for t in tok.encode_tgt(references)],
        "src": sources, "tgt": references}))

    assert validation_translations(model, data, tok, len(sources), beam=1) == greedy_texts
    assert validation_translations(model, data, tok, len(sources), beam=3) == beam_texts
    assert validation_translations(model, data, tok, 7) == greedy_texts[:7]
    bleu = validate_bleu(model, data, tok, len(sources), beam=1)
    assert bleu == score(greedy_texts, references)["bleu"]
    assert validate_bleu(model, data, tok, len(sources), beam=3) == \
        score(beam_texts, references)["bleu"] < bleu
