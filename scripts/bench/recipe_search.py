"""A recipe search scored on validation only: train each candidate (a list of config overrides)
for the same wall-clock budget, then score the checkpoint `traduire translate` would use on the
run's validation set (loss, and beam-5 BLEU/chrF). Test sets are scored only on request
(--score-tests), once, after the search has picked on validation.

    python scripts/bench/recipe_search.py --config configs/multi30k-en-fr.yaml --budget 30m \\
        --out runs/search/m30k --parallel 2 \\
        --candidate shipped \\
        --candidate budget train.schedule=budget model.dropout=0.2
    python scripts/bench/recipe_search.py --out runs/search/m30k --score-tests shipped budget
    python scripts/bench/recipe_search.py --tiny      # two toy candidates, in seconds

Every candidate trains in its own run directory under --out, from one copy of the prepared
data and tokenizer stages (the same corpus and vocabulary for all). --parallel N trains N
candidates at once with train.threads = cores / N each: on a CPU the runs of one round share
the machine's drift alike, which makes their comparison fairer than runs taken one after
another, at the price of fewer steps each than one run with every core. --avx2 restricts torch
to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2), the
stand-in for a CPU without AVX-512 or bf16. Results go to OUT/results.jsonl, one line per
candidate; a candidate already there is not trained again.

With --peers PEERS (where ../shared/benchmarks/peers/fairseq/setup.sh built fairseq), a
candidate named `fairseq` is fairseq 0.12.2 trained as compare.py trains it (the same model,
batch, learning rate and warmup as the config, fp32) for the same budget, in its round beside
the others with the same threads, and scored alike on Multi30k's val and tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
if "--avx2" in sys.argv:  # before torch is imported, in this process and the runs it starts
    os.environ.update(AVX2_ONLY)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    DEFAULT_DATA,
    TESTS,
    TINY_OVERRIDES,
    apply_runtime_settings,
    machine,
    print_table,
    write_tiny_corpus,
)
from compare import Fairseq  # noqa: E402

from traduire.config import load_config, parse_duration  # noqa: E402
from traduire.evaluate import score  # noqa: E402
from traduire.files import read_text_lines  # noqa: E402
from traduire.pipeline import prepare  # noqa: E402
from traduire.translate import DecodeOptions, Translator  # noqa: E402

PREPARED = "_prepared"
FAIRSEQ = "fairseq"  # the candidate name of the peer, with --peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k-en-fr.yaml")
    parser.add_argument("--budget", default="30m", help="train.max_time of every candidate")
    parser.add_argument("--out", type=Path, default=Path("runs/search"))
    parser.add_argument("--data", type=Path, default=None,
                        help="data.dir (default: the Multi30k copy for a files config)")
    parser.add_argument("--candidate", nargs="+", action="append", default=[],
                        metavar=("NAME", "KEY=VALUE"),
                        help="a candidate: its name, then its config overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every candidate")
    parser.add_argument("--parallel", type=int, default=1,
                        help="candidates trained at once, the cores shared between them")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--avx2", action="store_true",
                        help="restrict torch to AVX2 (the stand-in for an AVX2-only CPU)")
    parser.add_argument("--peers", type=Path, default=None,
                        help="fairseq's peer directory: a candidate named fairseq trains it")
    parser.add_argument("--score-tests", nargs="+", metavar="NAME", default=None,
                        help="score these candidates' test sets (after the search)")
    parser.add_argument("--tiny", action="store_true",
                        help="two toy candidates on a toy corpus for a few seconds each")
    args = parser.parse_args()
    apply_runtime_settings()
    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-search-"))
        args.data, args.out, args.budget = write_tiny_corpus(tiny_dir / "data"), tiny_dir, "3s"
        args.set = [*TINY_OVERRIDES, "train.save_every=20", "train.valid_every=20"]
        # Each schedule named: the config's own (budget, in the shipped one) is not the baseline.
        args.candidate = [["inverse_sqrt", "train.schedule=inverse_sqrt"],
                          ["budget", "train.schedule=budget"]]
        args.parallel = 2
    if args.score_tests:
        rows = [score_tests(args, name) for name in args.score_tests]
        print_table(rows, ["candidate", "test", "bleu", "chrf", "checkpoint"])
        return
    results = search(args)
    print_table(results, ["candidate", "steps", "best_step", "best_valid_loss",
                          "last_valid_loss", "last_vs_best", "checkpoint", "valid_bleu",
                          "valid_chrf"])
    if tiny_dir is not None:  # the test sets of one candidate too, as --score-tests does
        tests = score_tests(args, "budget")
        print(json.dumps({"benchmark": "recipe_search", "candidates": results,
                          "tests": tests}))
        shutil.rmtree(tiny_dir, ignore_errors=True)


def data_overrides(args: argparse.Namespace) -> list[str]:
    data = args.data
    if data is None and load_config(args.config).data.source == "files":
        data = DEFAULT_DATA
    return [f"data.dir={Path(data).resolve()}"] if data is not None else []


def search(args: argparse.Namespace) -> list[dict]:
    """Train the candidates not yet in OUT/results.jsonl, `parallel` at a time, and score each
    on validation; returns every candidate's result."""
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = {r["candidate"]: r for r in _read_jsonl(results_file)}
    todo = [c for c in args.candidate if c[0] not in done]
    base = [f"train.max_time={args.budget}", *data_overrides(args), *args.set]
    prepared = args.out / PREPARED
    if todo and not (prepared / "stages" / "tokenizer.json").exists():
        prepare(args.config, prepared, base)
    threads = max(1, args.cores // args.parallel)
    fairseq = peer(args, threads) if any(c[0] == FAIRSEQ for c in todo) else None
    for start in range(0, len(todo), args.parallel):
        round_ = todo[start:start + args.parallel]
        with ThreadPoolExecutor(len(round_)) as pool:
            runs = [pool.submit(train_fairseq, args, fairseq) if name == FAIRSEQ else
                    pool.submit(train, args, name, [*base, f"train.threads={threads}", *overrides])
                    for name, *overrides in round_]
            for future in runs:
                future.result()
        for name, *overrides in round_:
            scores = score_fairseq(args, fairseq) if name == FAIRSEQ else score_valid(args, name)
            result = {"candidate": name, "overrides": overrides, "budget": args.budget,
                      "parallel": args.parallel, "train_threads": threads,
                      "avx2_only": args.avx2, **scores, **machine()}
            done[name] = result
            with results_file.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    return [done[c[0]] for c in args.candidate if c[0] in done] or list(done.values())


def train(args: argparse.Namespace, name: str, overrides: list[str]) -> None:
    """`traduire train` for one candidate in OUT/NAME, seeded with the prepared stages."""
    run_dir = args.out / name
    if not run_dir.exists():
        shutil.copytree(args.out / PREPARED, run_dir)
    command = [sys.executable, "-m", "traduire", "train", "--config", args.config,
               "--run-dir", str(run_dir)]
    for override in ["train.progress=false", *overrides]:
        command += ["--set", override]
    print(f"{name}: {' '.join(command)}", flush=True)
    with (run_dir / "search.log").open("a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"candidate {name}: training failed (log in {run_dir / 'search.log'})")


def peer(args: argparse.Namespace, threads: int) -> Fairseq:
    """fairseq, its data binarised before any round starts (not inside a round's budget)."""
    if not Fairseq.installed(args.peers):
        sys.exit(f"a candidate named {FAIRSEQ} needs --peers: the directory where "
                 "../shared/benchmarks/peers/fairseq/setup.sh built fairseq")
    fairseq = Fairseq(args.peers.resolve(), (args.out / FAIRSEQ).resolve(),
                      Path(data_overrides(args)[0].split("=", 1)[1]), threads)
    fairseq.prepare()
    return fairseq


def train_fairseq(args: argparse.Namespace, fairseq: Fairseq) -> None:
    config = load_config(args.config)
    print(f"{FAIRSEQ}: fairseq-train for {args.budget}", flush=True)
    fairseq.train(parse_duration(args.budget), config.train.warmup_steps, config.train.lr)


def score_fairseq(args: argparse.Namespace, fairseq: Fairseq) -> dict:
    """fairseq's updates and its last checkpoint's beam-5 scores on val (its `valid` subset)."""
    checkpoint, updates = fairseq.train(parse_duration(args.budget), 0, 0.0)  # trained: reused
    _, hypotheses = fairseq.decode(checkpoint, "valid", False)
    scores = score(hypotheses, read_text_lines(fairseq.data / "val.fr"))
    return {"steps": updates, "checkpoint": checkpoint.name,
            "valid_bleu": round(scores["bleu"], 2), "valid_chrf": round(scores["chrf"], 2)}


def score_valid(args: argparse.Namespace, name: str) -> dict:
    """What the run did (steps, validation losses) and the beam-search scores on its
    validation set of the checkpoint translate picks by default."""
    run_dir = args.out / name
    records = _read_jsonl(run_dir / "metrics.jsonl")
    valid = [r for r in records if "valid_loss" in r]
    translator = Translator.load(run_dir, device="cpu")
    torch.set_num_threads(args.cores)
    # the cleaned validation pairs the run validated on (data.max_valid of them)
    pairs = datasets.load_from_disk(str(run_dir / "data" / "valid"))
    hypotheses = [t.best for t in translator.translate_lines(pairs["src"],
                                                             DecodeOptions(beam=args.beam))]
    scores = score(hypotheses, pairs["tgt"])
    best, last = min(r["valid_loss"] for r in valid), valid[-1]["valid_loss"]
    return {"steps": valid[-1]["step"], "epochs": max(r.get("epoch", 0) for r in records),
            "best_valid_loss": best, "best_step": min(valid, key=lambda r: r["valid_loss"])["step"],
            "last_valid_loss": last, "last_vs_best": round(last / best - 1, 4),
            "checkpoint": translator.checkpoint.name, "valid_bleu": round(scores["bleu"], 2),
            "valid_chrf": round(scores["chrf"], 2),
            "schedule": next((r for r in records if "schedule" in r), None),
            "valid_curve": [(r["step"], r["valid_loss"]) for r in valid]}


def score_tests(args: argparse.Namespace, name: str) -> dict:
    """The test sets of one candidate, with the checkpoint translate picks by default."""
    if name == FAIRSEQ:
        return score_fairseq_tests(args)
    run_dir = args.out / name
    translator = Translator.load(run_dir, device="cpu")
    torch.set_num_threads(args.cores)
    config = load_config(args.config, data_overrides(args))
    if config.data.source == "files":
        tests = [(t, Path(config.data.dir) / f"{t}.{config.data.src_lang}",
                  Path(config.data.dir) / f"{t}.{config.data.tgt_lang}") for t in TESTS]
    else:
        data = run_dir / "data"  # the held-out split as `traduire eval` reads it
        tests = [("test", data / f"test.{config.data.src_lang}",
                  data / f"test.{config.data.tgt_lang}")]
    outputs = [(test, [t.best for t in translator.translate_lines(
                    read_text_lines(src), DecodeOptions(beam=args.beam))], read_text_lines(ref))
               for test, src, ref in tests]
    return record_tests(args, name, translator.checkpoint.name, outputs)


def score_fairseq_tests(args: argparse.Namespace) -> dict:
    fairseq = peer(args, args.cores)
    checkpoint, _ = fairseq.train(parse_duration(args.budget), 0, 0.0)  # trained: reused
    # ("test", "test1"): preprocess.sh's names of the two test sets
    outputs = [(test, fairseq.decode(checkpoint, subset, False)[1],
                read_text_lines(fairseq.data / f"{test}.fr"))
               for test, subset in zip(TESTS, ("test", "test1"), strict=True)]
    return record_tests(args, FAIRSEQ, checkpoint.name, outputs)


def record_tests(args: argparse.Namespace, name: str, checkpoint: str,
                 outputs: list[tuple[str, list[str], list[str]]]) -> dict:
    """One candidate's row of test scores from its (test, hypotheses, references), appended to
    OUT/tests.jsonl and printed."""
    row: dict = {"candidate": name, "checkpoint": checkpoint}
    for test, hypotheses, references in outputs:
        scores = score(hypotheses, references)
        row.update({f"{test}_bleu": round(scores["bleu"], 2),
                    f"{test}_chrf": round(scores["chrf"], 2),
                    "signature": scores["signature"]["bleu"]})
    names = [test for test, _, _ in outputs]
    row.update(test=", ".join(names), bleu=" / ".join(str(row[f"{t}_bleu"]) for t in names),
               chrf=" / ".join(str(row[f"{t}_chrf"]) for t in names))
    with (args.out / "tests.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
