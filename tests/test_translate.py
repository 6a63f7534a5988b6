"""Tests for traduire.translate's choice of decoding precision (the rest of translate is tested
through the CLI in test_evaluate, test_bad_input and test_fuzz)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from traduire import translate
from traduire.cli import app
from traduire.errors import TraduireError
from traduire.inspect_model import score_ids
from traduire.translate import DecodeOptions, Translator, decode_dtype

CPU = torch.device("cpu")
SOURCES = ["the dog runs", "a man in a red shirt", "", "two children play in the water"]


def test_explicit_precisions() -> None:
    assert decode_dtype("fp32", CPU) is torch.float32
    assert decode_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(TraduireError, match="expected one of auto, fp32, bf16"):
        decode_dtype("fp16", CPU)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16),
                                                  (False, torch.float32)])
def test_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected) -> None:
    monkeypatch.setattr(translate, "native_bf16", lambda device: native)
    assert decode_dtype("auto", CPU) is expected


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
    rescored = score_ids(fp32, [ids for ids, _ in pairs], [h.tokens for _, h in pairs])
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
