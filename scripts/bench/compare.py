"""traduire beside the reference toolkits, measured on the machine at hand in one sitting.

    python scripts/bench/compare.py                     # training and decoding speed (~40 min)
    python scripts/bench/compare.py --budget 30m        # + quality after 30 equal minutes each
    python scripts/bench/compare.py --dry-run           # (or --tiny) a toy corpus and model
    python scripts/bench/compare.py --no-training --run-dir runs/m30k   # decoding a trained run

Every figure is a ratio of runs made here, alternately (A B A B ..., medians), on the same
data, SentencePiece settings, model shape, batch and beam, and measured the same way for
every system:

  training   target tokens/s of the whole training loop (batching, forward, backward, the
             optimizer, logging) over the log windows of steps W+1..W+N, from each
             toolkit's own log: traduire's metrics.jsonl, fairseq's train_inner lines (wps,
             wpb). Both log every 10 steps and skip the same W warm-up steps. traduire fp32
             and, where the CPU computes bf16 natively, bf16; fairseq fp32
  decoding   beam 5 on test_2016_flickr, batches of 64 sentences and of 4,000 tokens, each
             figure a fresh process's first pass with the model loaded and no warm-up pass,
             as fairseq-generate measures itself (its own "sentences/s"):
             traduire in fp32, its best native precision and int8, and at its best
             precision as --threads processes of one thread each (translate --workers, a
             share of the file each); fairseq-generate; CTranslate2 fp32 and int8 on
             traduire's export (`traduire export`)
  quality    with --budget: traduire (the shipped config) and fairseq (the same schedule)
             trained for the same wall clock, then BLEU/chrF (sacreBLEU defaults) of beam 5
             on test_2016_flickr and test_2017_flickr (traduire at its automatic precision,
             and on test_2016 also in fp32 and int8, which must stay within 0.5 BLEU of
             fp32); the checkpoint each system decoded and its step count are recorded

The rounds of one figure must agree within 15% (largest / smallest); where they do not, the
figure is measured again (training: with twice the warm-up), as the output says, and the
comparison fails if they still disagree after --retries.

Peers: fairseq 0.12.2 as built by ../shared/benchmarks/peers/fairseq/setup.sh (its venv in
PEERS/fairseq/venv; the data is prepared with its preprocess.sh); CTranslate2 from pip
(`pip install 'traduire[ctranslate2]'`). A peer that is not installed is skipped with one line.
Output: the CPU (model and vector extensions), torch and threads, one JSON line, a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    AGREEMENT,
    DEFAULT_DATA,
    TESTS,
    TINY_OVERRIDES,
    agree,
    machine,
    print_table,
    spread,
    write_tiny_corpus,
)

from traduire.config import load_config, parse_duration  # noqa: E402
from traduire.device import decoding_precision, training_precision  # noqa: E402
from traduire.evaluate import score  # noqa: E402
from traduire.monitor import read_metrics  # noqa: E402
from traduire.translate import default_checkpoint  # noqa: E402

FAIRSEQ_SCRIPTS = ROOT.parent / "shared" / "benchmarks" / "peers" / "fairseq"
LOG_EVERY = 10  # train_bench.sh's --log-interval; traduire is given the same
INT8_TOLERANCE = 0.5  # BLEU that int8 decoding may lose against fp32 on test_2016
BATCHINGS = ("64", "tokens")  # 64 sentences a batch; 4,000 source tokens a batch
CPU = torch.device("cpu")


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 7200
        ) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    return result


def last_json(output: str) -> dict[str, Any]:
    return json.loads(next(line for line in reversed(output.splitlines())
                           if line.startswith("{")))


# --- fairseq's logs ----------------------------------------------------------------------------

# fairseq 0.12.2, --log-format simple: "<date> <time> | INFO | train_inner | epoch 001:     10
# / 227 loss=..., wps=..., wpb=..., num_updates=10, ..." every --log-interval updates.
_TRAIN_INNER = re.compile(r"\| train_inner \| epoch \d+:\s+\d+ / \d+ (.*)$", re.MULTILINE)
# fairseq-generate's summary (decoding time only: its timer runs around each batch's search).
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                         r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)")
# checkpoint_utils.save_checkpoint: the updates of the checkpoint just written
# (checkpoint_last.pt is written at every save, beside checkpoint_best.pt where it improved).
_SAVED = re.compile(r"Saved checkpoint (\S+) \(epoch (\d+) @ (\d+) updates")


def fairseq_training_speed(log: str, warmup: int, steps: int, log_every: int = LOG_EVERY
                           ) -> dict[str, Any]:
    """Target tokens/s of fairseq-train's whole loop over updates warmup+1 .. warmup+steps.

    Each train_inner line covers the updates since the previous one: wps is their target
    tokens over the wall time since that line (a TimeMeter reset at every log line), wpb their
    mean target tokens per update (with their EOS, as traduire's tgt_tokens). So a window's
    tokens are wpb x updates and its seconds tokens / wps, and the figure is the windows'
    tokens over their seconds."""
    windows, previous = [], 0
    for match in _TRAIN_INNER.finditer(log):
        stats = dict(item.split("=", 1) for item in match.group(1).split(", ") if "=" in item)
        try:
            updates, wps, wpb = int(stats["num_updates"]), float(stats["wps"]), float(stats["wpb"])
        except (KeyError, ValueError):
            raise RuntimeError("a train_inner line of fairseq-train's log lacks num_updates=, "
                               f"wps= or wpb=: {match.group(0)!r}") from None
        if warmup <= previous and updates <= warmup + steps:
            tokens = wpb * (updates - previous)
            windows.append({"updates": updates, "tgt_tokens": tokens, "seconds": tokens / wps})
        previous = updates
    covered = [w["updates"] for w in windows]
    wanted = list(range(warmup + log_every, warmup + steps + 1, log_every))
    if covered != wanted:
        missing = sorted(set(wanted) - set(covered))
        raise RuntimeError(
            f"fairseq-train's log has no train_inner line (num_updates=, wps=, wpb=) for "
            f"updates {', '.join(map(str, missing)) or '?'} (found {covered or 'none'}; every "
            f"{log_every} updates from {warmup + log_every} to {warmup + steps} are needed):\n"
            f"{log[-1500:]}")
    tokens = sum(w["tgt_tokens"] for w in windows)
    seconds = sum(w["seconds"] for w in windows)
    return {"tgt_tokens_per_s": round(tokens / seconds, 1), "windows": windows}


def fairseq_checkpoint_updates(log: str) -> int:
    """The updates of the checkpoint_last.pt a fairseq-train log ended with (its last save)."""
    saves = _SAVED.findall(log)
    if not saves:
        raise RuntimeError("no 'Saved checkpoint ... (epoch E @ U updates' line in "
                           f"fairseq-train's log:\n{log[-1500:]}")
    return int(saves[-1][2])


def fairseq_generate(output: str) -> tuple[float, list[str]]:
    """fairseq-generate's own sentences/s and its hypotheses, in input order."""
    found = _TRANSLATED.search(output)
    if found is None:
        raise RuntimeError("fairseq-generate printed no 'Translated N sentences (T tokens) in "
                           f"Xs (S sentences/s, R tokens/s)' line:\n{output[-1500:]}")
    hyps = sorted((int(i), text) for i, text in
                  re.findall(r"^H-(\d+)\t[^\t]*\t(.*)$", output, re.MULTILINE))
    sentences = int(found.group(1).replace(",", ""))
    if len(hyps) != sentences:
        raise RuntimeError(f"fairseq-generate translated {sentences:,} sentences but printed "
                           f"{len(hyps):,} H- lines")
    return float(found.group(4)), [text for _, text in hyps]


# --- The systems -------------------------------------------------------------------------------


class Traduire:
    """traduire through its benchmark scripts and command line, each run a fresh process."""

    def __init__(self, work: Path, data: Path, threads: int, overrides: list[str],
                 log_every: int = LOG_EVERY) -> None:
        self.work, self.data, self.threads, self.log_every = work, data, threads, log_every
        self.overrides = [f"data.dir={data}", f"train.threads={threads}", *overrides]

    def sets(self, extra: list[str] = ()) -> list[str]:
        return [arg for key in [*self.overrides, *extra] for arg in ("--set", key)]

    def throughput(self, precision: str, steps: int, warmup: int) -> float:
        """Target tokens/s of the whole training loop after `warmup` steps (metrics.jsonl)."""
        output = run([sys.executable, str(HERE / "train_throughput.py"), "--precision",
                      precision, "--steps", str(steps), "--warmup", str(warmup), "--log-every",
                      str(self.log_every), "--threads", str(self.threads), "--run-dir",
                      str(self.work / "throughput"), *self.sets()]).stdout
        return last_json(output)["tgt_tokens_per_s"]

    def train(self, budget: str) -> Path:
        run_dir = self.work / "quality"
        run([sys.executable, "-m", "traduire", "train", "-c", "configs/multi30k-en-fr.yaml",
             "-r", str(run_dir), *self.sets([f"train.max_time={budget}"])])
        return run_dir

    def export(self, run_dir: Path, checkpoint: Path, quantization: str) -> Path:
        """traduire's CTranslate2 export of `checkpoint`, redone where it is older."""
        out = run_dir / f"ctranslate2-{quantization}"
        model = out / "model.bin"
        if not model.exists() or model.stat().st_mtime < checkpoint.stat().st_mtime:
            run([sys.executable, "-m", "traduire", "export", "-r", str(run_dir), "--checkpoint",
                 str(checkpoint), "-o", str(out), "--quantization", quantization, "--force"])
        return out

    def decode(self, run_dir: Path, precision: str, batch: str, engine: str = "torch",
               engine_dir: Path | None = None, workers: int = 1) -> float:
        """Sentences/s of beam 5 on test_2016 at one batching (64 sentences, or 'tokens': 4,000
        tokens), in a fresh process without a warm-up pass, as fairseq-generate is timed.
        With `workers`, that many processes translate a share each, the threads split among
        them (timed once each has loaded the model)."""
        where = ["--engine-dir", str(engine_dir)] if engine_dir else []
        output = run([sys.executable, str(HERE / "decode_speed.py"), "--run-dir", str(run_dir),
                      "--engine", engine, *where, "--precisions", precision, "--beams", "5",
                      "--batches", batch, "--repeats", "1", "--warmup-passes", "0",
                      "--threads", str(max(1, self.threads // workers)),
                      "--workers", str(workers),
                      "--src", str(self.data / f"{TESTS[0]}.en")]).stdout
        return last_json(output)["rows"][0]["sentences_per_s"]

    def translations(self, run_dir: Path, test: str, precision: str = "auto") -> list[str]:
        out = self.work / f"{test}.traduire-{precision}.fr"
        run([sys.executable, "-m", "traduire", "translate", str(self.data / f"{test}.en"),
             "-r", str(run_dir), "-o", str(out), "--beam", "5", "--precision", precision, "-q"])
        return out.read_text(encoding="utf-8").splitlines()


class Fairseq:
    """fairseq 0.12.2 through the peer's benchmark scripts (fp32, the same shape and batch)."""

    def __init__(self, peers: Path, work: Path, data: Path, threads: int) -> None:
        self.peers, self.work, self.data = peers, work, data
        self.env = {"PEERS_DIR": str(peers), "NICE": "", "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads)}

    @staticmethod
    def installed(peers: Path | None) -> bool:
        return peers is not None and (peers / "fairseq/venv/bin/fairseq-train").exists()

    def prepare(self) -> Path:
        data_bin = self.work / "fairseq" / "data-bin"
        if not (data_bin / "dict.en.txt").exists():
            run(["bash", str(FAIRSEQ_SCRIPTS / "preprocess.sh"), str(self.data),
                 str(self.work / "fairseq")], env=self.env)
        return data_bin

    def throughput(self, steps: int, warmup: int, lr_warmup: int) -> float:
        """Target tokens/s of fairseq-train's whole loop after `warmup` updates (its log)."""
        save = tempfile.mkdtemp(dir=self.work)
        output = run(["bash", str(FAIRSEQ_SCRIPTS / "train_bench.sh"), str(self.prepare()),
                      save, "--warmup-init-lr", "1e-7"],
                     env={**self.env, "WARMUP": str(lr_warmup),
                          "MAX_UPDATE": str(warmup + steps)})
        return fairseq_training_speed(output.stdout + output.stderr, warmup,
                                      steps)["tgt_tokens_per_s"]

    def train(self, budget_s: float, warmup: int, lr: float) -> tuple[Path, int]:
        """checkpoint_last.pt after `budget_s` of training, and its updates (from the log,
        kept beside it so that a rerun reuses both)."""
        save = self.work / "fairseq" / "quality"
        log = save / "train.log"
        if not (save / "checkpoint_last.pt").exists():
            output = run(["bash", str(FAIRSEQ_SCRIPTS / "train_bench.sh"), str(self.prepare()),
                          str(save), "--warmup-init-lr", "1e-7", "--lr", str(lr),
                          "--max-update", "10000000", "--stop-time-hours",
                          f"{budget_s / 3600:.6f}"],
                         env={**self.env, "WARMUP": str(warmup), "SAVE": "1"})
            log.write_text(output.stdout + output.stderr, encoding="utf-8")
        if not log.exists():
            raise RuntimeError(f"{save / 'checkpoint_last.pt'} has no training log beside it "
                               f"({log}): delete {save} to train fairseq again")
        return save / "checkpoint_last.pt", fairseq_checkpoint_updates(log.read_text("utf-8"))

    def decode(self, checkpoint: Path, subset: str, by_tokens: bool) -> tuple[float, list[str]]:
        """fairseq-generate's own sentences/s (decoding time only) and its hypotheses."""
        batching = ["--batch-size", "100000", "--max-tokens", "4000"] if by_tokens else []
        output = run(["bash", str(FAIRSEQ_SCRIPTS / "decode_bench.sh"), str(self.prepare()),
                      str(checkpoint), "--gen-subset", subset, *batching], env=self.env)
        return fairseq_generate(output.stdout + output.stderr)


# --- Rounds ------------------------------------------------------------------------------------


class Unsteady(RuntimeError):
    """The rounds of a figure still disagree after every retry."""


def steady(measures: dict[str, Callable[[int], Any]], rounds: int, retries: int,
           retry_how: dict[str, str], notes: list[str], tolerance: float = AGREEMENT,
           unsteady: list[str] | None = None) -> dict[str, list[Any]]:
    """Each measurement once per round, in turn (A B C A B C ...), `rounds` rounds; then,
    while the rounds of some figure disagree by more than `tolerance`, those figures again
    (`rounds` fresh rounds, alternating among them), up to `retries` times. A measurement is
    called with the attempt number (0 first), so that a retry can warm up for longer
    (`retry_how` says how, for the notes). A figure is a number or a dict of numbers; each
    number must agree. Raises Unsteady when a figure still disagrees, unless `unsteady` is a
    list: then the figure keeps every round measured (its median is of them all) and its
    name goes into the list."""
    results: dict[str, list[Any]] = {}
    every: dict[str, list[Any]] = {name: [] for name in measures}
    todo = list(measures)
    for attempt in range(retries + 1):
        fresh: dict[str, list[Any]] = {name: [] for name in todo}
        for _ in range(rounds):
            for name in todo:
                fresh[name].append(measures[name](attempt))
        results.update(fresh)
        for name, values in fresh.items():
            every[name] += values
        todo = [name for name in todo if not all(agree(series) for series in
                                                 _series(results[name]))]
        for name in todo:
            worst = max(spread(series) for series in _series(results[name]))
            text = (f"{name}: rounds {_rounds_text(results[name])} differ by {worst:.0%} "
                    f"(more than {tolerance:.0%})")
            if attempt == retries and unsteady is not None:
                results[name] = every[name]
                unsteady.append(name)
                notes.append(f"{text} after every retry: UNSTEADY, the median of all "
                             f"{len(every[name])} rounds is reported")
                print(f"note: {notes[-1]}", file=sys.stderr)
                continue
            if attempt == retries:
                raise Unsteady(f"{text} after {retries} retr{'y' if retries == 1 else 'ies'}: "
                               "the machine is not steady enough for this figure (another job? "
                               "give a longer --train-warmup or more --retries)")
            notes.append(f"{text}: measured again, {rounds} rounds"
                         f"{retry_how.get(name, '')}")
            print(f"note: {notes[-1]}", file=sys.stderr)
        if not todo:
            break
    return results


def _series(values: list[Any]) -> list[list[float]]:
    if values and isinstance(values[0], dict):
        return [[v[key] for v in values] for key in values[0]]
    return [values]


def _rounds_text(values: list[Any]) -> str:
    if values and isinstance(values[0], dict):
        return "; ".join(f"{key}: " + " · ".join(f"{v[key]:,.1f}" for v in values)
                         for key in values[0])
    return " · ".join(f"{v:,.1f}" for v in values)


def median_of(values: list[dict[str, float]] | list[float]) -> Any:
    if values and isinstance(values[0], dict):
        return {k: round(statistics.median(v[k] for v in values), 1) for k in values[0]}
    return round(statistics.median(values), 1)


def int8_check(quality: dict[str, dict[str, Any]], enforced: bool = True, test: str = TESTS[0],
               tolerance: float = INT8_TOLERANCE) -> dict[str, Any]:
    """Whether traduire's int8 decoding stays within `tolerance` BLEU of fp32 on `test`.
    `enforced`: whether a failure fails the comparison (not for --dry-run's toy model, whose
    20 test sentences move by more than that for one word)."""
    fp32, int8 = (quality[f"traduire {p} {test}"]["bleu"] for p in ("fp32", "int8"))
    drop = round(fp32 - int8, 2)
    return {"test": test, "fp32_bleu": fp32, "int8_bleu": int8, "drop": drop,
            "tolerance": tolerance, "ok": drop <= tolerance, "enforced": enforced}


def exit_status(result: dict[str, Any]) -> int:
    """1 where an enforced int8 check failed, else 0."""
    check = result.get("int8_check")
    return 1 if check is not None and check["enforced"] and not check["ok"] else 0


# --- The comparison ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", help="also train both for this wall clock (e.g. 30m) and "
                        "compare BLEU/chrF")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per figure")
    parser.add_argument("--retries", type=int, default=2, help="times a figure whose rounds "
                        "disagree is measured again (training: with twice the warm-up)")
    parser.add_argument("--keep-going", action="store_true", help="report a figure whose rounds "
                        "still disagree after the retries (marked UNSTEADY: the median of all "
                        "its rounds) instead of stopping; on a shared or throttled machine")
    parser.add_argument("--train-warmup", type=int, default=50, help="training steps before "
                        "the timed ones (a multiple of 10)")
    parser.add_argument("--train-steps", type=int, default=50, help="timed training steps "
                        "(a multiple of 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--peers", type=Path, default=os.environ.get("PEERS_DIR"),
                        help="folder given to the fairseq peer's setup.sh")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--run-dir", type=Path, help="decode this trained traduire run "
                        "(instead of the one --budget trains in the work directory)")
    parser.add_argument("--no-training", action="store_true", help="skip the training-speed "
                        "figures (decoding and quality only)")
    parser.add_argument("--dry-run", "--tiny", dest="dry_run", action="store_true",
                        help="a toy corpus and model, no fairseq: checks that everything "
                        "runs, in a minute")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides: list[str] = []
    log_every = LOG_EVERY
    if args.dry_run:
        args.data = write_tiny_corpus(work / "data")
        overrides = list(TINY_OVERRIDES)
        args.rounds, args.peers = 1, None
        args.budget = args.budget or "3s"
        log_every, args.train_warmup, args.train_steps = 2, 2, 4
    if args.train_warmup % log_every or args.train_steps % log_every or args.train_steps <= 0:
        parser.error(f"--train-warmup and --train-steps must be multiples of {log_every}: both "
                     f"toolkits log every {log_every} steps, and a figure is whole log windows")
    traduire = Traduire(work / "traduire", args.data, args.threads, overrides, log_every)
    fairseq = (Fairseq(args.peers, work, args.data, args.threads)
               if Fairseq.installed(args.peers) else None)
    if fairseq is None:
        print("fairseq: not set up (run ../shared/benchmarks/peers/fairseq/setup.sh PEERS and "
              "give --peers PEERS); skipped", file=sys.stderr)
    result: dict[str, Any] = {"benchmark": "compare", **machine(),
                              "native_bf16": training_precision("auto", CPU) == "bf16",
                              "threads": args.threads, "notes": []}
    try:
        measure(args, result, traduire, fairseq,
                load_config(ROOT / "configs" / "multi30k-en-fr.yaml", overrides))
    except Unsteady as error:
        result["error"] = str(error)
        finish(result)
        raise SystemExit(f"compare: {error}") from None
    return finish(result)


def measure(args: argparse.Namespace, result: dict[str, Any], traduire: Traduire,
            fairseq: Fairseq | None, config: Any) -> None:
    """Fill `result` with every figure."""
    notes = result["notes"]
    if args.keep_going:
        result["unsteady"] = []
    unsteady = result.get("unsteady")
    steps, warmup = args.train_steps, args.train_warmup
    # Training speed: the same steps of the whole loop for every system; a retry doubles the
    # warm-up (oneDNN builds a bf16 kernel per batch shape: the first hundred steps can run at
    # a third of the steady speed).
    result["training_warmup_steps"], result["training_steps"] = warmup, steps
    measures: dict[str, Callable[[int], Any]] = {
        "traduire fp32": lambda a: traduire.throughput("fp32", steps, warmup * 2 ** a)}
    if result["native_bf16"] and not args.dry_run:
        measures["traduire bf16"] = lambda a: traduire.throughput("bf16", steps,
                                                                  warmup * 2 ** a)
    if fairseq is not None:
        measures["fairseq fp32"] = lambda a: fairseq.throughput(steps, warmup * 2 ** a,
                                                                config.train.warmup_steps)
    longer = ", with twice the warm-up"
    if not args.no_training:
        training = steady(measures, args.rounds, args.retries,
                          dict.fromkeys(measures, longer), notes, unsteady=unsteady)
        result["training_tgt_tok_per_s"] = {k: median_of(v) for k, v in training.items()}
        result["training_runs"] = training

    # Quality after equal wall clock: the models to decode with.
    run_dir = (args.run_dir.resolve() if args.run_dir
               else traduire.train(args.budget) if args.budget else traduire.work / "quality")
    fairseq_ckpt = None
    if args.budget and fairseq is not None:
        fairseq_ckpt, result["fairseq_steps"] = fairseq.train(
            parse_duration(args.budget), config.train.warmup_steps, config.train.lr)
    if not (run_dir / "tokenizer").is_dir():
        print(f"no trained traduire model in {run_dir}: give --budget to train one; decoding "
              "and quality skipped", file=sys.stderr)
        return
    checkpoint = default_checkpoint(run_dir)
    result["checkpoints"] = {"traduire": checkpoint.name}
    result["traduire_steps"] = last_step(run_dir)
    if fairseq_ckpt is not None:
        result["checkpoints"]["fairseq"] = fairseq_ckpt.name

    # Decoding speed: cold, as fairseq-generate measures itself (see Traduire.decode).
    best = decoding_precision("auto", CPU)
    precisions = ["fp32"] if args.dry_run else list(dict.fromkeys(["fp32", best, "int8"]))
    measures = {f"traduire {p}": (lambda a, p=p: {
        batch: traduire.decode(run_dir, p, batch) for batch in BATCHINGS}) for p in precisions}
    if args.threads > 1:  # the same threads, as processes of one thread (translate --workers)
        wide = best if best in precisions else precisions[0]
        measures[f"traduire {wide} --workers {args.threads}"] = lambda a: {
            batch: traduire.decode(run_dir, wide, batch, workers=args.threads)
            for batch in BATCHINGS}
    if importlib.util.find_spec("ctranslate2") is None:
        print("ctranslate2: not installed (pip install 'traduire[ctranslate2]'); skipped",
              file=sys.stderr)
    else:
        quantizations = {"fp32": "float32"} if args.dry_run else {"fp32": "float32",
                                                                    "int8": "int8"}
        exports = {p: traduire.export(run_dir, checkpoint, q) for p, q in quantizations.items()}
        result["checkpoints"]["ctranslate2"] = f"export of {checkpoint.name}"
        for p in quantizations:
            measures[f"ctranslate2 {p}"] = lambda a, p=p: {
                batch: traduire.decode(run_dir, p, batch, "ctranslate2", exports[p])
                for batch in BATCHINGS}
    if fairseq_ckpt is not None:
        measures["fairseq fp32"] = lambda a: {
            batch: fairseq.decode(fairseq_ckpt, "test", batch == "tokens")[0]
            for batch in BATCHINGS}
    again = ", the same way (cold by design)"
    decoding = steady(measures, args.rounds, args.retries, dict.fromkeys(measures, again),
                      notes, unsteady=unsteady)
    result["decoding_sentences_per_s"] = {k: median_of(v) for k, v in decoding.items()}
    result["decoding_runs"] = decoding
    result["decoding_warmup"] = "none: a fresh process's first pass, model loaded"

    # Quality.
    if args.budget:
        quality = {}
        for test in TESTS:
            refs = (args.data / f"{test}.fr").read_text(encoding="utf-8").splitlines()
            systems = {"traduire": traduire.translations(run_dir, test)}
            if test == TESTS[0]:  # int8 is checked against fp32 here (int8_check)
                for precision in ("fp32", "int8"):
                    systems[f"traduire {precision}"] = traduire.translations(run_dir, test,
                                                                             precision)
            if fairseq_ckpt is not None:
                subset = "test" if test == TESTS[0] else "test1"
                systems["fairseq"] = fairseq.decode(fairseq_ckpt, subset, False)[1]
            for name, hyps in systems.items():
                scores = score(hyps, refs)
                quality[f"{name} {test}"] = {"bleu": scores["bleu"], "chrf": scores["chrf"],
                                             "signature": scores["signature"]}
        result["quality"] = quality
        result["budget"] = args.budget
        result["int8_check"] = int8_check(quality, enforced=not args.dry_run)


def last_step(run_dir: Path) -> int | None:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return records[-1]["step"] if records else None


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """Print the JSON line and the ratio table (and, loudly, a failed int8 check)."""
    print(json.dumps(result))
    print(f"\n{result['cpu']} ({', '.join(result['isa']) or 'no AVX2'}), torch "
          f"{result['torch']}, {result['threads']} threads")
    rows = []
    train = result.get("training_tgt_tok_per_s", {})
    reference = train.get("fairseq fp32")
    for name, value in train.items():
        marked = f"{name} (UNSTEADY)" if name in result.get("unsteady", []) else name
        rows.append({"figure": "training tgt tok/s", "system": marked, "value": value,
                     "vs fairseq": round(value / reference, 2) if reference else None})
    decode = result.get("decoding_sentences_per_s", {})
    fairseq_decode = decode.get("fairseq fp32", {})
    ct2_int8 = decode.get("ctranslate2 int8", {})
    for name, speeds in decode.items():
        for batch, value in speeds.items():
            marked = f"{name} (UNSTEADY)" if name in result.get("unsteady", []) else name
            rows.append({"figure": f"beam-5 sent/s, batch {batch}", "system": marked,
                         "value": value,
                         "vs fairseq": (round(value / fairseq_decode[batch], 2)
                                        if fairseq_decode.get(batch) else None),
                         "vs ct2 int8": (round(value / ct2_int8[batch], 2)
                                         if ct2_int8.get(batch) else None)})
    for system, key in (("traduire", "traduire_steps"), ("fairseq", "fairseq_steps")):
        if result.get(key) is not None:
            rows.append({"figure": "steps trained", "system": system, "value": result[key]})
    for system, name in result.get("checkpoints", {}).items():
        rows.append({"figure": "checkpoint decoded", "system": system, "value": name})
    for name, scores in result.get("quality", {}).items():
        rows.append({"figure": "BLEU / chrF", "system": name,
                     "value": f"{scores['bleu']:.1f} / {scores['chrf']:.1f}"})
    print_table(rows, ["figure", "system", "value", "vs fairseq", "vs ct2 int8"])
    if "training_warmup_steps" in result:
        print(f"training: steps {result['training_warmup_steps'] + 1}-"
              f"{result['training_warmup_steps'] + result['training_steps']} of the whole loop "
              "(more warm-up where a retry says so); decoding: no warm-up pass for anyone")
    for note in result.get("notes", []):
        print(f"note: {note}")
    check = result.get("int8_check")
    if check is not None:
        verdict = "ok" if check["ok"] else "FAILED"
        line = (f"int8 check {verdict}: {check['test']} BLEU {check['int8_bleu']:.2f} int8 "
                f"against {check['fp32_bleu']:.2f} fp32 (drop {check['drop']:.2f}, at most "
                f"{check['tolerance']} allowed)"
                + ("" if check["enforced"] else "; not enforced for a toy model"))
        print(line)
        if not check["ok"]:
            print(f"!! {line}", file=sys.stderr)
    return result


if __name__ == "__main__":
    started = time.monotonic()
    outcome = main()
    print(f"({(time.monotonic() - started) / 60:.1f} minutes)", file=sys.stderr)
    # A failed int8 check fails the comparison, after every figure has been printed.
    sys.exit(exit_status(outcome))
