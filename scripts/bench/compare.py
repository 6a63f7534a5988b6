"""traduire beside the reference toolkits, measured on the machine at hand in one sitting.

    python scripts/bench/compare.py                     # training and decoding speed (~40 min)
    python scripts/bench/compare.py --budget 30m        # + quality after 30 equal minutes each
    python scripts/bench/compare.py --dry-run           # a tiny corpus and model, no peers

Every figure is a ratio of runs made here, alternately (A B A B ..., medians), on the same
data, SentencePiece settings, model shape, batch and beam:

  training   steady-state target tokens/s (steps 11-60): traduire fp32 and, where the CPU
             computes bf16 natively, bf16; fairseq fp32
  decoding   beam 5 on test_2016_flickr, batches of 64 sentences and of 4,000 tokens:
             traduire in fp32, its best native precision and int8; fairseq-generate;
             CTranslate2 fp32 and int8 on traduire's export (`traduire export`)
  quality    with --budget: traduire (the shipped config) and fairseq (the same schedule)
             trained for the same wall clock, then BLEU/chrF (sacreBLEU defaults) of beam 5
             on test_2016_flickr and test_2017_flickr (traduire at its automatic precision,
             and on test_2016 also in fp32 and int8)

Peers: fairseq 0.12.2 as built by ../shared/benchmarks/peers/fairseq/setup.sh (its venv in
PEERS/fairseq/venv; the data is prepared with its preprocess.sh); CTranslate2 from pip
(`pip install 'traduire[ctranslate2]'`). A peer that is not installed is skipped with one line.
Output: the CPU (model and vector extensions), torch and threads, one JSON line, a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from common import DEFAULT_DATA, machine, print_table  # noqa: E402

FAIRSEQ_SCRIPTS = ROOT.parent / "shared" / "benchmarks" / "peers" / "fairseq"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
TESTS = ("test_2016_flickr", "test_2017_flickr")


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return [flag for flag in ISA_FLAGS if flag in flags]


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


class Traduire:
    """traduire through its benchmark scripts and command line, each run a fresh process."""

    def __init__(self, work: Path, data: Path, threads: int, overrides: list[str]) -> None:
        self.work, self.data, self.threads = work, data, threads
        self.overrides = [f"data.dir={data}", f"train.threads={threads}", *overrides]

    def sets(self, extra: list[str] = ()) -> list[str]:
        return [arg for key in [*self.overrides, *extra] for arg in ("--set", key)]

    def throughput(self, precision: str, steps: int, warmup: int) -> float:
        output = run([sys.executable, str(HERE / "train_throughput.py"), "--precision",
                      precision, "--steps", str(steps), "--warmup", str(warmup), "--threads",
                      str(self.threads), "--run-dir", str(self.work / "throughput"),
                      *self.sets()]).stdout
        return last_json(output)["tgt_tokens_per_s"]

    def train(self, budget: str) -> Path:
        run_dir = self.work / "quality"
        run([sys.executable, "-m", "traduire", "train", "-c", "configs/multi30k-en-fr.yaml",
             "-r", str(run_dir), *self.sets([f"train.max_time={budget}"])])
        return run_dir

    def decode(self, run_dir: Path, precision: str, engine: str = "torch",
               engine_dir: Path | None = None) -> dict[str, float]:
        """Sentences/s of beam 5 on test_2016, per batching (64 sentences, 4,000 tokens)."""
        where = ["--engine-dir", str(engine_dir)] if engine_dir else []
        output = run([sys.executable, str(HERE / "decode_speed.py"), "--run-dir", str(run_dir),
                      "--engine", engine, *where, "--precisions", precision, "--beams", "5",
                      "--batches", "64,tokens", "--repeats", "1", "--threads",
                      str(self.threads), "--src", str(self.data / f"{TESTS[0]}.en")]).stdout
        return {row["batch"]: row["sentences_per_s"] for row in last_json(output)["rows"]}

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

    def throughput(self, warmup: int) -> float:
        """Median target tokens/s (wps) over updates 11-60 of fairseq-train's log."""
        save = tempfile.mkdtemp(dir=self.work)
        output = run(["bash", str(FAIRSEQ_SCRIPTS / "train_bench.sh"), str(self.prepare()),
                      save, "--warmup-init-lr", "1e-7"],
                     env={**self.env, "WARMUP": str(warmup), "MAX_UPDATE": "60"})
        log = output.stdout + output.stderr
        rates = [float(wps) for wps, updates in re.findall(r"wps=([\d.]+),.*?num_updates=(\d+)",
                                                           log) if int(updates) > 10]
        if not rates:
            raise RuntimeError(f"no wps lines in fairseq's log:\n{log[-1500:]}")
        return statistics.median(rates)

    def train(self, budget_s: float, warmup: int, lr: float) -> Path:
        save = self.work / "fairseq" / "quality"
        if not (save / "checkpoint_last.pt").exists():
            run(["bash", str(FAIRSEQ_SCRIPTS / "train_bench.sh"), str(self.prepare()),
                 str(save), "--warmup-init-lr", "1e-7", "--lr", str(lr), "--max-update",
                 "10000000", "--stop-time-hours", f"{budget_s / 3600:.6f}"],
                env={**self.env, "WARMUP": str(warmup), "SAVE": "1"})
        return save / "checkpoint_last.pt"

    def decode(self, checkpoint: Path, subset: str, by_tokens: bool) -> tuple[float, list[str]]:
        """fairseq-generate's own sentences/s (decoding time only) and its hypotheses."""
        batching = ["--batch-size", "100000", "--max-tokens", "4000"] if by_tokens else []
        output = run(["bash", str(FAIRSEQ_SCRIPTS / "decode_bench.sh"), str(self.prepare()),
                      str(checkpoint), "--gen-subset", subset, *batching], env=self.env)
        log = output.stdout + output.stderr
        speed = re.search(r"\(([\d.]+) sentences/s", log)
        hyps = sorted((int(i), text) for i, text in
                      re.findall(r"^H-(\d+)\t[^\t]*\t(.*)$", output.stdout, re.MULTILINE))
        return (float(speed.group(1)) if speed else float("nan")), [t for _, t in hyps]


def alternate(rounds: int, measures: dict[str, Any]) -> dict[str, list[Any]]:
    """Each measurement once per round, in turn: A B C A B C ..."""
    results: dict[str, list[Any]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return results


def median_of(values: list[dict[str, float]] | list[float]) -> Any:
    if values and isinstance(values[0], dict):
        return {k: round(statistics.median(v[k] for v in values), 1) for k in values[0]}
    return round(statistics.median(values), 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", help="also train both for this wall clock (e.g. 30m) and "
                        "compare BLEU/chrF")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--peers", type=Path, default=os.environ.get("PEERS_DIR"),
                        help="folder given to the fairseq peer's setup.sh")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--dry-run", action="store_true", help="a tiny corpus and model, no "
                        "fairseq: checks that everything runs, in a minute")
    args = parser.parse_args(argv)
    import torch

    from traduire.config import load_config, parse_duration
    from traduire.device import decoding_precision, training_precision
    from traduire.evaluate import score

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides: list[str] = []
    steps, warmup = 50, 10
    if args.dry_run:
        args.data = write_tiny_corpus(work / "data")
        overrides = ["model.layers=1", "model.d_model=32", "model.heads=2", "model.ffn_dim=64",
                     "tokenizer.vocab_size=40", "train.batch_tokens=300"]
        steps, warmup, args.rounds, args.peers = 3, 1, 1, None
        args.budget = args.budget or "10s"
    traduire = Traduire(work / "traduire", args.data, args.threads, overrides)
    config = load_config(ROOT / "configs" / "multi30k-en-fr.yaml", overrides)
    fairseq = (Fairseq(args.peers, work, args.data, args.threads)
               if Fairseq.installed(args.peers) else None)
    if fairseq is None:
        print("fairseq: not set up (run ../shared/benchmarks/peers/fairseq/setup.sh PEERS and "
              "give --peers PEERS); skipped", file=sys.stderr)
    cpu = torch.device("cpu")
    native = training_precision("auto", cpu)
    result: dict[str, Any] = {"benchmark": "compare", **machine(), "isa": cpu_flags(),
                              "native_bf16": native == "bf16", "threads": args.threads}

    # Training throughput.
    measures: dict[str, Any] = {"traduire fp32": lambda: traduire.throughput("fp32", steps,
                                                                             warmup)}
    if native == "bf16" and not args.dry_run:
        measures["traduire bf16"] = lambda: traduire.throughput("bf16", steps, warmup)
    if fairseq is not None:
        measures["fairseq fp32"] = lambda: fairseq.throughput(config.train.warmup_steps)
    training = alternate(args.rounds, measures)
    result["training_tgt_tok_per_s"] = {k: median_of(v) for k, v in training.items()}
    result["training_runs"] = training

    # Quality after equal wall clock: the models to decode with.
    run_dir = traduire.train(args.budget) if args.budget else work / "traduire" / "quality"
    fairseq_ckpt = None
    if args.budget and fairseq is not None:
        fairseq_ckpt = fairseq.train(parse_duration(args.budget), config.train.warmup_steps,
                                     config.train.lr)
    if not (run_dir / "tokenizer").is_dir():
        print(f"no trained traduire model in {run_dir}: give --budget to train one; decoding "
              "and quality skipped", file=sys.stderr)
        return finish(result)

    # Decoding speed.
    best = decoding_precision("auto", cpu)
    precisions = ["fp32"] if args.dry_run else list(dict.fromkeys(["fp32", best, "int8"]))
    measures = {f"traduire {p}": (lambda p=p: traduire.decode(run_dir, p)) for p in precisions}
    try:
        import ctranslate2  # noqa: F401

        quantizations = {"fp32": "float32"} if args.dry_run else {"fp32": "float32",
                                                                    "int8": "int8"}
        for quantization in quantizations.values():
            out = run_dir / f"ctranslate2-{quantization}"
            if not (out / "model.bin").exists():
                run([sys.executable, "-m", "traduire", "export", "-r", str(run_dir), "-o",
                     str(out), "--quantization", quantization])
        for p, quantization in quantizations.items():
            measures[f"ctranslate2 {p}"] = lambda p=p, q=quantization: traduire.decode(
                run_dir, p, "ctranslate2", run_dir / f"ctranslate2-{q}")
    except ImportError:
        print("ctranslate2: not installed (pip install 'traduire[ctranslate2]'); skipped",
              file=sys.stderr)
    if fairseq_ckpt is not None:
        measures["fairseq fp32"] = lambda: {
            "64": fairseq.decode(fairseq_ckpt, "test", False)[0],
            "tokens": fairseq.decode(fairseq_ckpt, "test", True)[0]}
    decoding = alternate(args.rounds, measures)
    result["decoding_sentences_per_s"] = {k: median_of(v) for k, v in decoding.items()}
    result["decoding_runs"] = decoding

    # Quality.
    if args.budget:
        quality = {}
        for test in TESTS:
            refs = (args.data / f"{test}.fr").read_text(encoding="utf-8").splitlines()
            systems = {"traduire": traduire.translations(run_dir, test)}
            if test == TESTS[0]:  # int8 must stay within 0.5 BLEU of fp32 here
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
        result["traduire_steps"] = last_json_state(run_dir)
    return finish(result)


def last_json_state(run_dir: Path) -> int | None:
    from traduire.monitor import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return records[-1]["step"] if records else None


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """Print the JSON line and the ratio table."""
    print(json.dumps(result))
    print(f"\n{result['cpu']} ({', '.join(result['isa']) or 'no AVX2'}), torch "
          f"{result['torch']}, {result['threads']} threads")
    rows = []
    train = result.get("training_tgt_tok_per_s", {})
    reference = train.get("fairseq fp32")
    for name, value in train.items():
        rows.append({"figure": "training tgt tok/s", "system": name, "value": value,
                     "vs fairseq": round(value / reference, 2) if reference else None})
    decode = result.get("decoding_sentences_per_s", {})
    fairseq_decode = decode.get("fairseq fp32", {})
    ct2_int8 = decode.get("ctranslate2 int8", {})
    for name, speeds in decode.items():
        for batch, value in speeds.items():
            rows.append({"figure": f"beam-5 sent/s, batch {batch}", "system": name,
                         "value": value,
                         "vs fairseq": (round(value / fairseq_decode[batch], 2)
                                        if fairseq_decode.get(batch) else None),
                         "vs ct2 int8": (round(value / ct2_int8[batch], 2)
                                         if ct2_int8.get(batch) else None)})
    for name, scores in result.get("quality", {}).items():
        rows.append({"figure": "BLEU / chrF", "system": name,
                     "value": f"{scores['bleu']:.1f} / {scores['chrf']:.1f}"})
    print_table(rows, ["figure", "system", "value", "vs fairseq", "vs ct2 int8"])
    return result


def write_tiny_corpus(directory: Path) -> Path:
    """A Multi30k-shaped toy corpus for --dry-run: train, val and both test sets."""
    import random

    words = {"a": "un", "dog": "chien", "cat": "chat", "runs": "court", "sleeps": "dort",
             "big": "grand", "red": "rouge", "here": "ici", "the": "le", "eats": "mange"}
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 300), ("val", 30), *((t, 20) for t in TESTS)):
        pairs = []
        for _ in range(count):
            sentence = rng.choices(list(words), k=rng.randint(2, 6))
            pairs.append((" ".join(sentence), " ".join(words[w] for w in sentence)))
        for side, lang in ((0, "en"), (1, "fr")):
            (directory / f"{split}.{lang}").write_text(
                "".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    return directory


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({(time.monotonic() - started) / 60:.1f} minutes)", file=sys.stderr)
