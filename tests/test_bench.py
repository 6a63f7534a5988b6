"""The benchmark scripts run: each in its smallest mode, on tiny data made here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.slow
def test_compare_dry_run_measures_traduire_and_prints_the_ratio_table(tmp_path, capsys):
    compare = load("compare")
    result = compare.main(["--dry-run", "--work-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert "fairseq: not set up" in out.err  # a missing peer is one line, not a failure
    record = json.loads(next(line for line in out.out.splitlines() if line.startswith("{")))
    assert record == json.loads(json.dumps(result))
    assert set(record["isa"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert record["training_tgt_tok_per_s"]["traduire fp32"] > 0
    assert record["decoding_sentences_per_s"]["traduire fp32"].keys() == {"64", "tokens"}
    assert set(record["quality"]) == {"traduire test_2016_flickr", "traduire test_2017_flickr",
                                      "traduire fp32 test_2016_flickr",
                                      "traduire int8 test_2016_flickr"}
    header = next(line for line in out.out.splitlines() if line.startswith("figure"))
    assert header.split() == ["figure", "system", "value", "vs", "fairseq", "vs", "ct2", "int8"]
    assert "beam-5 sent/s, batch 64" in out.out and "BLEU / chrF" in out.out
