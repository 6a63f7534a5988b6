"""The benchmark scripts: fairseq's logs as compare.py reads them, the checks compare.py makes
(rounds that agree, int8 within its tolerance), and every script's --tiny mode, run as a
subprocess on data it makes itself, its figures read back from its output.

No test here asserts a speed: the figures of a tiny run on a shared machine say nothing, only
that they are there, finite and labelled."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"


def load(name: str):
    """A benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def compare():
    return load("compare")


# --- fairseq 0.12.2's logs -----------------------------------------------------------------------

# fairseq-train --log-format simple --log-interval 10 --max-update 40 --no-epoch-checkpoints on
# a CPU (no gb_free there): the train_inner lines, the stop, validation, the save, the epoch's
# summary.
TRAIN_LOG = """\
2026-01-01 00:00:00 | INFO | fairseq_cli.train | num. shared model params: 7,583,744 (num. trained: 7,583,744)
2026-01-01 00:00:01 | INFO | fairseq.trainer | begin training epoch 1
2026-01-01 00:00:01 | INFO | fairseq_cli.train | Start iterating over samples
2026-01-01 00:00:16 | INFO | train_inner | epoch 001:     10 / 227 loss=12.93, nll_loss=12.86, ppl=7432.1, wps=1200, ups=0.43, wpb=2800, bsz=101.2, num_updates=10, lr=2.5e-05, gnorm=3.512, train_wall=15, wall=16
2026-01-01 00:00:28 | INFO | train_inner | epoch 001:     20 / 227 loss=12.1, nll_loss=11.98, ppl=4038.2, wps=2400, ups=0.86, wpb=2800, bsz=99.5, num_updates=20, lr=5e-05, gnorm=2.104, train_wall=11, wall=28
2026-01-01 00:00:40 | INFO | train_inner | epoch 001:     30 / 227 loss=11.2, nll_loss=11.03, ppl=2090.7, wps=2500, ups=0.83, wpb=3000, bsz=110.3, num_updates=30, lr=7.5e-05, gnorm=1.881, train_wall=12, wall=40
2026-01-01 00:00:50 | INFO | train_inner | epoch 001:     40 / 227 loss=10.4, nll_loss=10.17, ppl=1152.4, wps=2000, ups=1, wpb=2000, bsz=80.1, num_updates=40, lr=0.0001, gnorm=1.642, train_wall=10, wall=50
2026-01-01 00:00:50 | INFO | fairseq_cli.train | Stopping training due to num_updates: 40 >= max_update: 40
2026-01-01 00:00:50 | INFO | fairseq_cli.train | begin validation on "valid" subset
2026-01-01 00:00:53 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 10.07 | nll_loss 9.8 | ppl 891.4 | wps 5012.3 | wpb 2901.2 | bsz 125.3 | num_updates 40
2026-01-01 00:00:54 | INFO | fairseq.checkpoint_utils | Saved checkpoint /tmp/save/checkpoint_best.pt (epoch 1 @ 40 updates, score 10.07) (writing took 0.41 seconds)
2026-01-01 00:00:54 | INFO | fairseq_cli.train | end of epoch 1 (average epoch stats below)
2026-01-01 00:00:54 | INFO | train | epoch 001 | loss 11.66 | nll_loss 11.51 | ppl 2916.3 | wps 2188.3 | ups 0.8 | wpb 2650 | bsz 97.8 | num_updates 40 | lr 0.0001 | gnorm 2.285 | train_wall 48 | wall 54
2026-01-01 00:00:54 | INFO | fairseq_cli.train | done training in 53.1 seconds
"""  # noqa: E501 - fairseq's lines as it writes them


def generate_output(sentences: int) -> str:
    """fairseq-generate's stdout for `sentences` sentences, in its batch order (not the input
    order), with its summary line."""
    lines = ["2026-01-01 00:01:00 | INFO | fairseq.tasks.translation | [en] dictionary: 7984 "
             "types"]
    for i in reversed(range(sentences)):
        lines += [f"S-{i}\t▁a ▁dog ▁number ▁{i}", f"T-{i}\tun chien numéro {i}",
                  f"H-{i}\t-0.4123\tun chien numéro {i}", f"D-{i}\t-0.4123\tun chien numéro {i}",
                  f"P-{i}\t-0.5 -0.3 -0.4 -0.4"]
    lines += ["2026-01-01 00:01:10 | INFO | fairseq_cli.generate | NOTE: hypothesis and token "
              "scores are output in base 2",
              f"2026-01-01 00:01:10 | INFO | fairseq_cli.generate | Translated {sentences:,} "
              "sentences (12,345 tokens) in 10.2s (98.04 sentences/s, 1210.29 tokens/s)",
              "Generate test with beam=5: BLEU4 = 41.30, 71.2/49.0/34.6/24.9 (BP=1.000, "
              "ratio=1.003, syslen=12345, reflen=12309)"]
    return "\n".join(lines) + "\n"


def test_fairseq_training_speed_is_its_windows_tokens_over_their_wall_time(compare):
    """Updates 11-40: windows of 28,000, 30,000 and 20,000 target tokens (wpb x 10) at 2,400,
    2,500 and 2,000 tokens/s; the warm-up window (wps 1200) is left out."""
    speed = compare.fairseq_training_speed(TRAIN_LOG, warmup=10, steps=30)
    seconds = 28_000 / 2_400 + 30_000 / 2_500 + 20_000 / 2_000
    assert speed["tgt_tokens_per_s"] == pytest.approx(78_000 / seconds, abs=0.1)
    assert [w["updates"] for w in speed["windows"]] == [20, 30, 40]
    assert [w["tgt_tokens"] for w in speed["windows"]] == [28_000, 30_000, 20_000]
    # All tokens over all the time: neither the median window's rate nor the mean rate.
    assert round(speed["tgt_tokens_per_s"]) not in (2_400, 2_300)


def test_fairseq_log_without_the_updates_asked_for_fails_naming_them(compare):
    cut = "".join(line + "\n" for line in TRAIN_LOG.splitlines() if "num_updates=40" not in line)
    with pytest.raises(RuntimeError, match=r"no train_inner line .* for updates 40 "):
        compare.fairseq_training_speed(cut, warmup=10, steps=30)
    no_speed = TRAIN_LOG.replace("wps=", "words=")
    with pytest.raises(RuntimeError, match="lacks num_updates=, wps= or wpb="):
        compare.fairseq_training_speed(no_speed, warmup=10, steps=30)
    with pytest.raises(RuntimeError, match="no train_inner line"):
        compare.fairseq_training_speed("fairseq-train: error: no data\n", warmup=10, steps=30)


def test_fairseq_steps_are_those_of_its_last_saved_checkpoint(compare):
    assert compare.fairseq_checkpoint_updates(TRAIN_LOG) == 40
    later = TRAIN_LOG + ("2026-01-01 00:31:00 | INFO | fairseq.checkpoint_utils | Saved checkpoint"
                         " /tmp/save/checkpoint_last.pt (epoch 9 @ 1229 updates, score 2.95) "
                         "(writing took 0.38 seconds)\n")
    assert compare.fairseq_checkpoint_updates(later) == 1229
    with pytest.raises(RuntimeError, match="no 'Saved checkpoint"):
        compare.fairseq_checkpoint_updates(TRAIN_LOG.replace("Saved checkpoint", "Wrote"))


def test_fairseq_generate_speed_line_and_hypotheses_in_input_order(compare):
    speed, hypotheses = compare.fairseq_generate(generate_output(1000))
    assert speed == 98.04
    assert len(hypotheses) == 1000
    assert hypotheses[:2] == ["un chien numéro 0", "un chien numéro 1"]
    assert hypotheses[-1] == "un chien numéro 999"


def test_fairseq_generate_without_its_speed_line_fails_with_a_message(compare):
    output = "".join(line + "\n" for line in generate_output(3).splitlines()
                     if "Translated" not in line)
    with pytest.raises(RuntimeError, match=r"printed no 'Translated N sentences"):
        compare.fairseq_generate(output)
    # The count of its summary and its H- lines must agree: a lost line would shift the scores.
    with pytest.raises(RuntimeError, match="translated 1,000 sentences but printed 999"):
        compare.fairseq_generate(generate_output(1000).replace("H-7\t", "X-7\t"))


# --- compare.py's checks ---------------------------------------------------------------------


def test_rounds_that_disagree_are_measured_again_with_a_longer_warmup(compare, capsys):
    """The bf16 rounds of the 2026-12-02 run (2,484 and 7,302 target tok/s) are measured again;
    a retry's rounds that agree are the figure, and the output says so."""
    attempts = []
    series = {0: [2484.0, 7302.0], 1: [7310.0, 7402.0]}

    def bf16(attempt):
        attempts.append(attempt)
        return series[attempt][attempts.count(attempt) - 1]

    notes = []
    result = compare.steady({"traduire bf16": bf16, "traduire fp32": lambda a: 2900.0}, 2, 2,
                            {"traduire bf16": ", with twice the warm-up"}, notes)
    assert result == {"traduire bf16": [7310.0, 7402.0], "traduire fp32": [2900.0, 2900.0]}
    assert attempts == [0, 0, 1, 1]  # fp32 agreed: it is not measured again
    assert notes == ["traduire bf16: rounds 2,484.0 · 7,302.0 differ by 194% (more than 15%): "
                     "measured again, 2 rounds, with twice the warm-up"]
    assert f"note: {notes[0]}" in capsys.readouterr().err


def test_rounds_that_never_agree_fail_the_comparison(compare):
    values = itertools.cycle([100.0, 200.0])
    with pytest.raises(compare.Unsteady, match=r"a: rounds 100.0 · 200.0 .* after 1 retry"):
        compare.steady({"a": lambda a: next(values)}, 2, 1, {}, [])
    decoding = iter([{"64": 50.0, "tokens": 60.0}, {"64": 51.0, "tokens": 90.0}] * 2)
    with pytest.raises(compare.Unsteady, match=r"tokens: 60.0 · 90.0 differ by 50%"):
        compare.steady({"traduire fp32": lambda a: next(decoding)}, 2, 1, {}, [])


def test_with_keep_going_an_unsteady_figure_keeps_all_its_rounds_and_is_named(compare):
    values = iter([100.0, 200.0, 110.0, 300.0])
    unsteady, notes = [], []
    result = compare.steady({"a": lambda a: next(values), "b": lambda a: 5.0}, 2, 1, {}, notes,
                            unsteady=unsteady)
    assert result == {"a": [100.0, 200.0, 110.0, 300.0], "b": [5.0, 5.0]}
    assert unsteady == ["a"] and compare.median_of(result["a"]) == 155.0
    assert "UNSTEADY, the median of all 4 rounds is reported" in notes[-1]


def test_int8_more_than_half_a_bleu_below_fp32_is_flagged(compare, capsys):
    quality = {"traduire fp32 test_2016_flickr": {"bleu": 56.2},
               "traduire int8 test_2016_flickr": {"bleu": 55.9}}
    assert compare.int8_check(quality)["ok"]
    quality["traduire int8 test_2016_flickr"]["bleu"] = 55.5
    check = compare.int8_check(quality)
    assert not check["ok"] and check["drop"] == pytest.approx(0.7)
    result = compare.finish({"cpu": "test CPU", "isa": [], "torch": "2", "threads": 1,
                             "int8_check": check})
    out = capsys.readouterr()
    assert "int8 check FAILED: test_2016_flickr BLEU 55.50 int8 against 56.20 fp32" in out.out
    assert out.err.startswith("!! int8 check FAILED")
    assert compare.exit_status(result) == 1
    # --dry-run's toy model: shown, not enforced.
    assert compare.exit_status({"int8_check": compare.int8_check(quality, enforced=False)}) == 0
    assert compare.exit_status({}) == 0


# --- Every script's --tiny mode --------------------------------------------------------------

# One thread each: two runs share the machine's two cores.
TINY_RUNS = {
    "compare": ["--dry-run", "--threads", "1", "--work-dir", "{tmp}/compare"],
    "decode_speed": ["--tiny", "--threads", "1"],
    "train_throughput": ["--tiny", "--threads", "1"],
    "quality": ["--tiny", "--set", "train.threads=1"],
    "step_overhead": ["--tiny", "--threads", "1"],
    "first_step": ["--tiny", "--set", "train.threads=1"],
    "data_scale": ["--tiny", "--workers", "1"],
    "kernels_check": ["--tiny", "--threads", "1"],
    "scale_run": ["--tiny"],
    "loss_memory": ["--tiny", "--threads", "1"],
    "aten_calls": ["--tiny", "--threads", "1"],
    "recipe_search": ["--tiny", "--cores", "2"],  # two candidates at once, a thread each
    # The one-call GPU benchmark (in scripts/, not scripts/bench/), tiny shapes on the CPU.
    "gpu_bench": ["--dry-run", "--models", "multi30k"],
}
SCRIPT_DIRS = {"gpu_bench": ROOT / "scripts"}  # the others are in BENCH


def tiny(script: str):
    """Marks a test as reading the tiny run of `script` (see tiny_runs)."""
    def mark(test):
        test.script = script
        return test
    return mark


def run_script(script: str, tmp: Path) -> subprocess.CompletedProcess:
    args = [a.replace("{tmp}", str(tmp)) for a in TINY_RUNS[script]]
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    path = SCRIPT_DIRS.get(script, BENCH) / f"{script}.py"
    return subprocess.run([sys.executable, str(path), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_runs(request, tmp_path_factory) -> dict[str, Future]:
    """The tiny runs of the scripts whose tests are selected, two at a time and started
    together, so that compare.py's, much the longest (a dozen processes), overlaps the rest."""
    tmp = tmp_path_factory.mktemp("bench")
    wanted = {getattr(item.function, "script", None) for item in request.session.items}
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {script: pool.submit(run_script, script, tmp)
            for script in TINY_RUNS if script in wanted}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


def output_of(runs: dict[str, Future], script: str) -> tuple[dict, str, str]:
    """The last JSON line of a tiny run's stdout, its stdout and its stderr; fails with its
    stderr if it failed."""
    done = runs[script].result()
    assert done.returncode == 0, f"{script} --tiny failed:\n{done.stderr[-3000:]}"
    record = json.loads(next(line for line in reversed(done.stdout.splitlines())
                             if line.startswith("{")))
    return record, done.stdout, done.stderr


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@tiny("compare")
def test_compare_tiny_skips_fairseq_and_records_what_each_system_decoded(tiny_runs):
    record, out, err = output_of(tiny_runs, "compare")
    assert "fairseq: not set up" in err and "; skipped" in err
    assert "fairseq fp32" not in record["training_tgt_tok_per_s"]
    assert finite(record["training_tgt_tok_per_s"]["traduire fp32"])
    assert record["training_tgt_tok_per_s"]["traduire fp32"] > 0
    assert (record["training_warmup_steps"], record["training_steps"]) == (2, 4)
    # average_last is off in the tiny config, so the run's default checkpoint is best.pt.
    assert record["checkpoints"]["traduire"] == "best.pt"
    assert record["traduire_steps"] > 0
    decoding = record["decoding_sentences_per_s"]
    if "ctranslate2: not installed" in err:
        assert set(decoding) == {"traduire fp32"}
    else:
        assert set(decoding) == {"traduire fp32", "ctranslate2 fp32"}
        assert record["checkpoints"]["ctranslate2"] == "export of best.pt"
    for speeds in decoding.values():
        assert speeds.keys() == {"64", "tokens"}
        assert all(finite(v) and v > 0 for v in speeds.values())
    assert record["decoding_warmup"].startswith("none")
    check = record["int8_check"]
    assert check["tolerance"] == 0.5 and isinstance(check["ok"], bool)
    assert check["enforced"] is False  # a toy model's 20 sentences
    assert check["fp32_bleu"] == record["quality"]["traduire fp32 test_2016_flickr"]["bleu"]
    assert f"int8 check {'ok' if check['ok'] else 'FAILED'}: test_2016_flickr" in out
    table = out.split("\n\n", 1)[1]
    rows = [line.split() for line in table.splitlines()]
    assert ["checkpoint", "decoded", "traduire", "best.pt"] in rows
    assert ["steps", "trained", "traduire", str(record["traduire_steps"])] in rows
    assert "beam-5 sent/s, batch tokens" in table
    assert "decoding: no warm-up pass for anyone" in table
    assert set(record["isa"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert set(record["quality"]) == {"traduire test_2016_flickr", "traduire test_2017_flickr",
                                      "traduire fp32 test_2016_flickr",
                                      "traduire int8 test_2016_flickr"}
    header = next(line for line in out.splitlines() if line.startswith("figure"))
    assert header.split() == ["figure", "system", "value", "vs", "fairseq", "vs", "ct2", "int8"]
    assert "beam-5 sent/s, batch 64" in out and "BLEU / chrF" in out


@tiny("decode_speed")
def test_decode_speed_tiny_times_each_precision_and_batching_after_its_warmup(tiny_runs):
    record, out, _ = output_of(tiny_runs, "decode_speed")
    rows = record["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [
        ("fp32", "16"), ("fp32", "tokens"), ("bf16", "16"), ("bf16", "tokens")]
    for r in rows:
        assert r["engine"] == "torch" and r["beam"] == 5 and r["sentences"] == 20
        assert finite(r["sentences_per_s"]) and r["sentences_per_s"] > 0
        assert finite(r["first_pass_s"])  # the warm-up pass, timed apart
    assert record["warmup_passes"] == 1 and record["checkpoint"].endswith("best.pt")
    assert "checkpoint best.pt; 1 warm-up pass(es) first" in out


@tiny("train_throughput")
def test_train_throughput_tiny_measures_the_whole_loop_from_its_log_windows(tiny_runs):
    record, out, _ = output_of(tiny_runs, "train_throughput")
    assert record["measured"] == "whole training loop, log windows"
    assert (record["warmup"], record["steps"], record["log_every"]) == (2, 4, 2)
    windows = record["window_tgt_tokens_per_s"]
    assert len(windows) == 2 and all(finite(w) and w > 0 for w in windows)
    # All the windows' tokens over all their time: between the slowest and the fastest window.
    assert min(windows) - 0.1 <= record["tgt_tokens_per_s"] <= max(windows) + 0.1
    assert record["src_tgt_tokens_per_s"] > record["tgt_tokens_per_s"]
    assert "fp32, steps 3-6 of the whole loop; windows of 2 steps" in out


@tiny("quality")
def test_quality_tiny_trains_for_its_budget_and_scores_both_test_sets(tiny_runs):
    record, _, _ = output_of(tiny_runs, "quality")
    assert record["budget"] == "3s" and record["steps"] > 0
    assert [r["test"] for r in record["rows"]] == ["test_2016_flickr", "test_2017_flickr"]
    for r in record["rows"]:
        assert 0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100
        assert r["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert Path(record["checkpoint"]).name.startswith("step_")  # --checkpoint last


@tiny("recipe_search")
def test_recipe_search_tiny_scores_candidates_on_validation_and_tests_only_when_asked(
        tiny_runs):
    record, out, _ = output_of(tiny_runs, "recipe_search")
    first, second = record["candidates"]
    assert (first["candidate"], second["candidate"]) == ("inverse_sqrt", "budget")
    assert first["train_threads"] == second["train_threads"] == 1  # the cores shared
    assert first["overrides"] == ["train.schedule=inverse_sqrt"]
    assert second["overrides"] == ["train.schedule=budget"]
    for candidate in (first, second):
        assert candidate["steps"] > 0 and candidate["budget"] == "3s"
        losses = [loss for _, loss in candidate["valid_curve"]]
        assert candidate["best_valid_loss"] == min(losses)
        assert candidate["last_valid_loss"] == losses[-1]
        assert candidate["last_vs_best"] >= 0
        assert 0 <= candidate["valid_bleu"] <= 100 and 0 <= candidate["valid_chrf"] <= 100
    # Only the budget schedule decides an end step, recorded in metrics.jsonl.
    assert first["schedule"] is None and second["schedule"]["schedule"] == "budget"
    tests = record["tests"]
    assert tests["candidate"] == "budget"
    assert 0 <= tests["test_2016_flickr_bleu"] <= 100
    assert 0 <= tests["test_2017_flickr_chrf"] <= 100
    assert "valid_bleu" in out and "budget" in out  # the table


@tiny("step_overhead")
def test_step_overhead_tiny_profiles_four_steps_in_parts(tiny_runs):
    record, out, _ = output_of(tiny_runs, "step_overhead")
    assert record["steps"] == 4 and record["batch_tokens"] == 300
    for part in ("step", "forward", "backward", "optimizer", "outside"):
        assert finite(record[f"{part}_ms"])
        assert f"  {part:<10}" in out
    assert record["forward_ms"] > 0 and record["backward_ms"] > 0
    assert record["step_ms"] >= record["forward_ms"] + record["backward_ms"]


@tiny("first_step")
def test_first_step_tiny_times_each_part_up_to_the_second_step(tiny_runs):
    record, out, _ = output_of(tiny_runs, "first_step")
    assert list(record["seconds"]) == ["open_encoded", "build_model",
                                       "token_batches", "plan_and_first_batch", "first_step",
                                       "second_batch", "second_step"]
    assert all(finite(s) and s >= 0 for s in record["seconds"].values())
    assert record["batches_in_epoch"] > 0 and record["usable"] > 0
    assert "model built -> end of first step (as training does it):" in out


@tiny("data_scale")
def test_data_scale_tiny_times_every_stage_of_a_2k_corpus(tiny_runs):
    record, out, _ = output_of(tiny_runs, "data_scale")
    assert record["n"] == 2000 and 0 < record["train_kept"] <= 2000
    assert set(record["stages"]) == {"load", "clean", "spm_train", "encode", "other"}
    assert all(finite(stage["seconds"]) for stage in record["stages"].values())
    assert (record["workers"], record["workers_used"]) == (1, 1)
    assert record["vocab_size"] == 40 and record["notes"] == []
    assert finite(record["peak_rss_mib"]) and record["peak_rss_mib"] > 0
    assert out.split("\n\n", 1)[1].startswith("n   load_s  clean_s  spm_train_s")


@tiny("kernels_check")
def test_kernels_check_tiny_names_the_forms_timed_and_the_one_traduire_runs(tiny_runs):
    record, out, _ = output_of(tiny_runs, "kernels_check")
    rows = {r["path"]: r for r in record["rows"]}
    attention = [r for path, r in rows.items() if path.startswith("attention")]
    for r in attention:
        assert finite(r["explicit_ms"]) and finite(r["fused_ms"])
        assert "traduire_ms" not in r
    # What kernels.fused_attention_wins decides on a CPU: fused for fp32 training only.
    assert rows["attention training float32"]["traduire_runs"] == "fused"
    assert rows["attention training float32 causal"]["traduire_runs"] == "fused"
    assert rows["attention decoding float32 self"]["traduire_runs"] == "explicit"
    assert all(r["traduire_runs"] == "explicit" for r in attention
               if "bfloat16" in r["path"] or "decoding" in r["path"])
    fused = rows["attention training float32"]
    assert fused["choice_speed_up"] == pytest.approx(fused["explicit_ms"] / fused["fused_ms"],
                                                     rel=0.02, abs=0.01)
    assert rows["dropout float32"]["traduire_runs"] == "kernels.dropout"
    assert finite(rows["dropout float32"]["F.dropout_ms"])
    assert rows["top-k of 8,000"]["traduire_runs"] == "top_per_row"
    assert out.splitlines()[1].split() == ["path", "explicit_ms", "fused_ms", "traduire_runs",
                                           "choice_speed_up"]


@tiny("scale_run")
def test_scale_run_tiny_measures_start_up_memory_checkpoints_and_the_epoch_boundary(tiny_runs):
    record, out, _ = output_of(tiny_runs, "scale_run")
    assert record["world"] == 2 and record["cold_cache"] == "not dropped (--no-drop)"
    assert finite(record["first_step_cold_s"]) and record["first_step_cold_s"] > 0
    # Launch to the first step's start comes before launch to its end.
    assert 0 < record["to_first_step_cold_s"] < record["first_step_cold_s"]
    assert len(record["peak_rss_mib"]) == len(record["peak_pss_mib"]) == 2
    assert all(0 < pss <= rss for pss, rss in zip(record["peak_pss_mib"],
                                                  record["peak_rss_mib"]))
    # A checkpoint at step 1 and at the end: each paused the loop, each was written.
    assert len(record["checkpoint_pause_s"]) >= 2 and len(record["checkpoint_write_s"]) >= 2
    # The resumed run crossed into the next epoch, and both ways of resuming were timed.
    assert finite(record["boundary_vs_median"]) and record["epoch_batches"] > 2
    assert all(finite(s) for s in record["resume_s"] + record["resume_each_reads_s"])
    assert "boundary/median" in out


@tiny("loss_memory")
def test_loss_memory_tiny_measures_each_form_in_a_process_of_its_own(tiny_runs):
    record, out, _ = output_of(tiny_runs, "loss_memory")
    forms = {r["form"]: r for r in record["rows"]}
    assert list(forms) == ["fp32_copy", "sliced", "sliced_new"]
    for r in forms.values():
        assert (r["tokens"], r["vocab"], r["label_smoothing"]) == (2000, 4000, 0.1)
        assert finite(r["above_logits_mib"]) and r["peak_mib"] >= r["rss_before_mib"]
    # As the training step calls it, the gradient is written over the logits.
    assert forms["sliced"]["grad_is_logits"] and not forms["fp32_copy"]["grad_is_logits"]
    # The same loss from each form, up to the random logits of each process.
    assert forms["sliced"]["loss"] == pytest.approx(forms["fp32_copy"]["loss"], rel=0.02)
    assert "peak resident memory of the loss's forward and backward above the logits" in out


@tiny("aten_calls")
def test_aten_calls_tiny_counts_eager_and_compiled_steps(tiny_runs):
    record, out, _ = output_of(tiny_runs, "aten_calls")
    assert [r["mode"] for r in record["rows"]] == ["eager", "compiled"]
    for r in record["rows"]:
        assert r["steps"] == 2 and r["aten"] >= r["top"] > 0 and r["casts"] >= 0
        assert r["compilations"] >= 0 and len(r["per_step"]) == 2
    assert "compiled / eager:" in out and record["tiny"] is True


@tiny("gpu_bench")
def test_gpu_bench_dry_run_prints_every_part_with_its_figures(tiny_runs):
    record, out, _ = output_of(tiny_runs, "gpu_bench")
    assert record["dry_run"] is True and record["device"] == "cpu (dry run)"
    rows = record["training"]["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [("multi30k", "compiled"),
                                                       ("multi30k", "eager")]
    for r in rows:
        assert "error" not in r, r
        for key in ("tgt_tok_per_s", "step_ms", "tgt_tokens_per_step", "loss"):
            assert finite(r[key]) and r[key] > 0, (key, r)
        assert finite(r["warmup_s"]) and r["warmup_s"] >= 0  # one eager step: may round to 0
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no GPU: no peak, no memory
    compiled, eager = rows
    # One compilation takes every batch shape; the eager model compiles nothing.
    assert compiled["compilations"] == 1 and eager["compilations"] == 0
    assert [r["form"] for r in record["loss"]["rows"]] == ["fp32_copy", "sliced"]
    losses = [r["loss"] for r in record["loss"]["rows"]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    assert [r["mask"] for r in record["attention"]["rows"]] == ["additive", "boolean", "none"]
    for part in ("training", "loss", "attention"):
        assert f"== {part} (cpu (dry run)" in out
