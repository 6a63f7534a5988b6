"""How the data and tokenizer stages scale with corpus size: wall time of each stage (load,
clean, SentencePiece training, encode) and the peak resident memory of the whole process tree,
on synthetic English-French corpora of 100k, 1M and 4M sentence pairs.

    python scripts/bench/data_scale.py                              # 100k, 1M, 4M
    python scripts/bench/data_scale.py --sizes 100k --keep          # keep the run directory
    nice -n 10 python scripts/bench/data_scale.py --sizes 1M --workers 2 --work-dir /tmp/ds
    python scripts/bench/data_scale.py --tiny       # 2k pairs of a toy corpus, in seconds

The corpora are recombined from the Multi30k training text, so sentence lengths and vocabulary
are real while almost every pair is distinct: each synthetic pair starts from a random Multi30k
pair and, on each side independently, about half of its words are replaced by words drawn from
that language's word-frequency distribution; 1% of the pairs repeat an earlier pair exactly, so
deduplication has work to do. A corpus depends only on (N, --seed) and is cached under
--work-dir/corpora, so reruns (and the same benchmark on other code) read identical files;
each result names the corpus by a SHA-256 over its four files.

Each size runs in a fresh subprocess (this script started again) on a fresh run directory with
the data and tokenizer sections of configs/multi30k-en-fr.yaml (joint unigram, 8000 pieces,
default input_sentence_size). The four stages are timed by wrapping the functions that
traduire.pipeline looks up as module globals (load_corpus, clean, train_tokenizer,
encode_corpus) around pipeline.prepare, summed over splits; whatever runs outside them (saving
Arrow, reloading it) is "other".

Peak RSS is sampled every 0.2 s over the benchmark process and all its descendants (e.g.
`datasets` worker processes) and summed; pages shared between forked processes count once per
process, so with workers it overstates the memory the machine really needs. The summed PSS
(proportional set size: a page shared by k processes counts 1/k in each) is sampled beside it
where the kernel has /proc/<pid>/smaps_rollup: that is what the process tree really holds. The
kernel's own high-water mark of the benchmark process alone is reported too.

Prints one JSON line per size on stdout, then a table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    apply_runtime_settings,
    cpu_flags,
    cpu_model,
    print_table,
    write_tiny_corpus,
)

from traduire.runtime import data_workers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "multi30k-en-fr.yaml"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "traduire-data-scale"

# Stage name -> the traduire.pipeline global that does it.
STAGES = {"load": "load_corpus", "clean": "clean", "spm_train": "train_tokenizer",
          "encode": "encode_corpus"}

# Bump when the generator changes, so cached corpora made by an older recipe are not reused.
CORPUS_VERSION = 1
VALID_PAIRS = 1_000
REPLACE_FRACTION = 0.5
REPEAT_FRACTION = 0.01
# Pairs generated per block. Each block has its own random stream (seeded by seed and block
# number) and bounded memory; fixed so a corpus depends on (N, seed) alone.
BLOCK = 250_000
SAMPLE_EVERY_S = 0.2


# --- Synthetic corpus --------------------------------------------------------------------------


class Side:
    """One language of the Multi30k training text as arrays: the word ids of every sentence
    (CSR: flat ids, offsets, lengths) and the word-frequency distribution."""

    def __init__(self, lines: list[str]) -> None:
        index: dict[str, int] = {}
        ids: list[int] = []
        lengths = []
        for line in lines:
            words = line.split()
            ids.extend(index.setdefault(w, len(index)) for w in words)
            lengths.append(len(words))
        self.ids = np.asarray(ids, dtype=np.int32)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.cumsum(self.lengths) - self.lengths
        counts = np.bincount(self.ids, minlength=len(index))
        self.cdf = np.cumsum(counts) / counts.sum()
        words = list(index)  # dicts keep insertion order: position = id
        # A word followed by its separator: the first len(words) entries end in a space, the
        # rest in a newline (the last word of a line), so a line is one gather and one join.
        self.pieces = np.array([w.encode() + b" " for w in words]
                               + [w.encode() + b"\n" for w in words], dtype=object)


def read_templates(data_dir: Path, src: str, tgt: str) -> tuple[Side, Side]:
    src_lines = (data_dir / f"train.{src}").read_text(encoding="utf-8").splitlines()
    tgt_lines = (data_dir / f"train.{tgt}").read_text(encoding="utf-8").splitlines()
    if len(src_lines) != len(tgt_lines):
        sys.exit(f"{data_dir}: train.{src} and train.{tgt} differ in line count")
    # An empty template line would produce no newline and break the alignment.
    pairs = [(s, t) for s, t in zip(src_lines, tgt_lines) if s.split() and t.split()]
    return Side([s for s, _ in pairs]), Side([t for _, t in pairs])


def gather_rows(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate rows of a CSR array: the flat values and the lengths of the chosen rows."""
    lens = lengths[rows]
    total = int(lens.sum())
    starts = np.repeat(offsets[rows] - (np.cumsum(lens) - lens), lens)
    return flat[starts + np.arange(total)], lens


def synthetic_block(sides: tuple[Side, Side], n: int, rng: np.random.Generator
                    ) -> tuple[bytes, bytes]:
    """n synthetic pairs as the bytes of the two aligned files."""
    # Which pairs repeat an earlier one, and which: a repeat copies a random earlier distinct
    # pair of the block (never the first pair, which has nothing before it).
    repeat = rng.random(n) < REPEAT_FRACTION
    repeat[0] = False
    distinct = n - int(repeat.sum())
    made = np.cumsum(~repeat)  # distinct pairs made up to and including each position
    row = made - 1
    row[repeat] = (rng.random(int(repeat.sum())) * made[repeat]).astype(np.int64)
    templates = rng.integers(0, len(sides[0].lengths), distinct)
    out = []
    for side in sides:
        ids, lens = gather_rows(side.ids, side.offsets, side.lengths, templates)
        replace = rng.random(len(ids)) < REPLACE_FRACTION
        drawn = np.searchsorted(side.cdf, rng.random(int(replace.sum())), side="right")
        ids[replace] = np.minimum(drawn, len(side.cdf) - 1)  # guard cdf[-1] rounding below 1
        ids, lens = gather_rows(ids, np.cumsum(lens) - lens, lens, row)
        last = np.cumsum(lens) - 1
        ids = ids.astype(np.int64)
        ids[last] += len(side.cdf)  # the newline-terminated form of the line's last word
        out.append(b"".join(side.pieces[ids].tolist()))
    return out[0], out[1]


def corpus_dir(work_dir: Path, n: int, seed: int) -> Path:
    return work_dir / "corpora" / f"n{n}-seed{seed}-v{CORPUS_VERSION}"


def make_corpus(work_dir: Path, n: int, seed: int, source: Path, langs: tuple[str, str]
                ) -> dict[str, Any]:
    """Write (or find cached) train.<lang> and val.<lang> with n and VALID_PAIRS pairs."""
    target = corpus_dir(work_dir, n, seed)
    meta_path = target / "meta.json"
    wanted = {"version": CORPUS_VERSION, "n": n, "seed": seed, "valid_pairs": VALID_PAIRS,
              "langs": list(langs), "source": str(source.resolve()),
              "source_bytes": [(source / f"train.{lang}").stat().st_size for lang in langs]}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return {**meta, "dir": str(target), "cached": True}
        shutil.rmtree(target)  # made from other source files: stale
    start = time.perf_counter()
    sides = read_templates(source, *langs)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed into place, so an interrupted run leaves nothing
    # that looks like a finished corpus.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    digest = hashlib.sha256()
    for prefix, count, stream in (("train", n, 0), ("val", VALID_PAIRS, 1)):
        files = [open(tmp / f"{prefix}.{lang}", "wb") for lang in langs]
        with files[0], files[1]:
            for block, first in enumerate(range(0, count, BLOCK)):
                rng = np.random.default_rng([seed, stream, block])
                for file, data in zip(files, synthetic_block(sides, min(BLOCK, count - first),
                                                             rng)):
                    file.write(data)
        for lang in langs:  # digest file by file so it does not depend on block boundaries
            with open(tmp / f"{prefix}.{lang}", "rb") as file:
                while chunk := file.read(1 << 24):
                    digest.update(chunk)
    meta = {**wanted, "sha256": digest.hexdigest(),
            "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is meant to be reused
    tmp.rename(target)
    return {**meta, "dir": str(target), "cached": False}


# --- Memory sampling ---------------------------------------------------------------------------


def _has_children_files() -> bool:
    return any(Path(f"/proc/self/task/{tid}/children").exists()
               for tid in os.listdir("/proc/self/task"))


def _children_from_tasks(pid: int) -> list[int]:
    children = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                children += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
            except OSError:
                pass  # the thread ended meanwhile
    except OSError:
        pass  # the process ended meanwhile
    return children


def _children_from_stat() -> dict[int, list[int]]:
    """Parent -> children for every process, from /proc/<pid>/stat: for kernels built without
    CONFIG_PROC_CHILDREN, which have no /proc/<pid>/task/<tid>/children."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may itself hold spaces and parentheses.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # ended, or a zombie (no VmRSS line)


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # ended, or a kernel without smaps_rollup


def tree_rss_kib(root: int, use_children_files: bool, pss: bool = False
                 ) -> tuple[int, int, int]:
    """Summed VmRSS of `root` and all its descendants, how many processes that is, and (if
    `pss`) their summed PSS (else 0)."""
    tree = None if use_children_files else _children_from_stat()
    total, total_pss, count, todo, seen = 0, 0, 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_kib(pid)
        total_pss += _pss_kib(pid) if pss else 0
        count += 1
        todo += _children_from_tasks(pid) if tree is None else tree.get(pid, [])
    return total, count, total_pss


class PeakSampler(threading.Thread):
    """Samples the process tree's RSS every SAMPLE_EVERY_S and keeps the peak, overall and per
    stage (the stage running when the sample was taken)."""

    def __init__(self, stage_of: Callable[[], str]) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.stage_of = stage_of
        self.use_children_files = _has_children_files()
        self.stop_event = threading.Event()
        self.has_pss = Path(f"/proc/{os.getpid()}/smaps_rollup").exists()
        self.peak_kib, self.peak_stage, self.max_processes = 0, "", 1
        self.peak_pss_kib = 0
        self.stage_peak_kib: dict[str, int] = {}
        self.samples, self.max_gap_s = 0, 0.0

    def sample(self) -> None:
        kib, processes, pss_kib = tree_rss_kib(os.getpid(), self.use_children_files,
                                               self.has_pss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss_kib)
        stage = self.stage_of()
        self.samples += 1
        self.max_processes = max(self.max_processes, processes)
        self.stage_peak_kib[stage] = max(self.stage_peak_kib.get(stage, 0), kib)
        if kib > self.peak_kib:
            self.peak_kib, self.peak_stage = kib, stage

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop_event.wait(SAMPLE_EVERY_S):
            self.sample()
            # A long gap means the thread could not get the GIL and peaks may have been missed.
            now = time.perf_counter()
            self.max_gap_s = max(self.max_gap_s, now - last)
            last = now

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


# --- One size, in its own process --------------------------------------------------------------


class StageTimer:
    """Wraps pipeline functions so each call adds its wall time to its stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.active: list[str] = []
        self.overlap = False  # a wrapped call started inside another: times then overlap
        self.lock = threading.Lock()

    def current(self) -> str:
        with self.lock:
            return self.active[-1] if self.active else "other"

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.overlap |= bool(self.active)
                self.active.append(stage)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                with self.lock:
                    self.active.remove(stage)
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed
                    self.calls[stage] = self.calls.get(stage, 0) + 1

        timed.__wrapped__ = function  # type: ignore[attr-defined]
        return timed


def git_commit(path: Path) -> tuple[str | None, str | None, bool]:
    """The commit checked out where `path` is, the last commit that changed `path` (a
    benchmark-only commit changes the first, not the second), and whether `path` has
    uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return (git("rev-parse", "HEAD"), git("log", "-1", "--format=%H", "--", "."),
                bool(git("status", "--porcelain", "--", ".")))
    except (OSError, subprocess.CalledProcessError):
        return None, None, False


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the data and tokenizer stages on one corpus (in this process) and measure them."""
    import traduire
    from traduire import pipeline
    from traduire.config import load_config

    notes = []
    overrides = [f"data.dir={args.corpus}", *args.set]
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    config = load_config(args.config, overrides)
    n = args.child_n
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True)

    timer = StageTimer()
    for stage, name in STAGES.items():
        setattr(pipeline, name, timer.wrap(stage, getattr(pipeline, name)))

    baseline_kib, _, _ = tree_rss_kib(os.getpid(), _has_children_files())
    sampler = PeakSampler(timer.current)
    sampler.start()
    start = time.perf_counter()
    pipeline.prepare(config, run_dir)
    total = time.perf_counter() - start
    sampler.stop()

    mib = 1 / 1024
    stages: dict[str, dict[str, Any]] = {}
    for stage in (*STAGES, "other"):
        seconds = (total - sum(timer.seconds.values()) if stage == "other"
                   else timer.seconds.get(stage))
        if seconds is None:
            continue
        stages[stage] = {"seconds": round(seconds, 2),
                         "pairs_per_s": round(n / seconds) if seconds > 0 else None,
                         "calls": timer.calls.get(stage),
                         # None: the stage was too short to be sampled
                         "peak_rss_mib": (round(sampler.stage_peak_kib[stage] * mib)
                                          if stage in sampler.stage_peak_kib else None)}
    if timer.overlap:
        notes.append("wrapped calls overlapped: stage times overlap and 'other' is understated")
    kept = json.loads((run_dir / "data" / "report.json").read_text())["train"]["kept"]
    commit, code_commit, dirty = git_commit(Path(traduire.__file__).resolve().parent)
    return {
        "benchmark": "data_scale", "n": n, "train_kept": kept,
        "stages": stages, "total_seconds": round(total, 2),
        "pairs_per_s": round(n / total),
        "peak_rss_mib": round(sampler.peak_kib * mib),
        "peak_stage": sampler.peak_stage,
        "peak_pss_mib": round(sampler.peak_pss_kib * mib) if sampler.has_pss else None,
        "peak_rss_self_hwm_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mib),
        "baseline_rss_mib": round(baseline_kib * mib),
        "max_processes": sampler.max_processes, "rss_samples": sampler.samples,
        "max_sample_gap_s": round(sampler.max_gap_s, 2),
        # data.dir is the corpus, named separately; the rest is what differs from the file.
        "config": str(args.config),
        "overrides": [o for o in overrides if not o.startswith("data.dir=")],
        "workers": config.data.workers,
        "workers_used": data_workers(config.data.workers),
        "vocab_size": config.tokenizer.vocab_size,
        "input_sentence_size": config.tokenizer.input_sentence_size,
        "cpu": cpu_model(), "isa": cpu_flags(), "cores": len(os.sched_getaffinity(0)),
        "nice": os.nice(0), "loadavg_start": args.loadavg,
        "torch": version("torch"), "datasets": version("datasets"),
        "sentencepiece": version("sentencepiece"), "python": sys.version.split()[0],
        "commit": commit, "code_commit": code_commit, "dirty": dirty, "notes": notes,
    }


# --- Driver ------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 100k, 1M, 4M)")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "k": 1_000, "m": 1_000_000}[unit.lower()])


def label(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def run_size(args: argparse.Namespace, n: int, corpus: dict[str, Any]) -> dict[str, Any]:
    """Measure one size in a fresh interpreter, so one size's memory does not carry over to
    the next and every size pays the same imports."""
    run_dir = args.work_dir / "runs" / f"n{n}-{time.strftime('%Y%m%d-%H%M%S')}"
    result_file = run_dir.with_suffix(".json")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child-n", str(n),
               "--corpus", corpus["dir"], "--run-dir", str(run_dir),
               "--result-file", str(result_file), "--config", str(args.config),
               "--loadavg", f"{os.getloadavg()[0]:.2f}"]
    command += [f"--set={item}" for item in args.set]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    # `datasets` caches nothing outside the run directory, so no size reuses another's work.
    env = {**os.environ, "HF_DATASETS_CACHE": str(run_dir / "hf-cache")}
    # The child's stdout joins our stderr: stdout is for the result lines only.
    done = subprocess.run(command, env=env, stdout=sys.stderr)
    if done.returncode == 0:
        result = json.loads(result_file.read_text())
    else:  # reported as a row, so the other sizes still run
        result = {"benchmark": "data_scale", "n": n, "error": f"exit status {done.returncode}"
                  + (" (killed: out of memory?)" if done.returncode == -9 else "")}
    result_file.unlink(missing_ok=True)
    if args.keep:
        result["run_dir"] = str(run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    result["corpus"] = {"sha256": corpus["sha256"][:16], "seed": corpus["seed"],
                        "valid_pairs": corpus["valid_pairs"], "dir": corpus["dir"],
                        "generated_s": None if corpus["cached"] else corpus["seconds"]}
    return result


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"n": label(result["n"])}
    if "error" in result:
        return {**row, "total_s": result["error"]}
    for stage in (*STAGES, "other"):
        row[f"{stage}_s"] = result["stages"].get(stage, {}).get("seconds")
    return {**row, "total_s": result["total_seconds"], "pairs/s": result["pairs_per_s"],
            "peak_rss_mib": result["peak_rss_mib"], "peak_in": result["peak_stage"],
            "peak_pss_mib": result.get("peak_pss_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100k,1M,4M",
                        help="comma-separated training pair counts (k = 1e3, M = 1e6)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic corpora")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="corpora (cached) and run directories; outside the repository")
    parser.add_argument("--workers", type=int, help="data.workers (0: every core)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="Multi30k folder with train.<lang> to recombine")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="its data and tokenizer sections are used")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--tiny", action="store_true", help="2k pairs recombined from a toy "
                        "corpus, 40 pieces, in a temporary work directory: checks that it runs")
    # Internal: one size, measured in this process (how the driver runs each size).
    for name, kind in (("--child-n", int), ("--corpus", str), ("--run-dir", str),
                       ("--result-file", str), ("--loadavg", float)):
        parser.add_argument(name, help=argparse.SUPPRESS, type=kind)
    args = parser.parse_args()
    apply_runtime_settings()

    if args.child_n is not None:
        result = measure(args)
        Path(args.result_file).write_text(json.dumps(result) + "\n")
        return

    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-data-scale-"))
        args.data = write_tiny_corpus(tiny_dir / "data")
        args.work_dir, args.sizes = tiny_dir / "work", "2k"
        args.set = ["tokenizer.vocab_size=40", *args.set]
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.work_dir = args.work_dir.expanduser().resolve()
    if args.work_dir.is_relative_to(REPO):
        parser.error(f"--work-dir {args.work_dir} is inside the repository; choose a folder "
                     "outside it (corpora and runs take gigabytes)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from traduire.config import load_config

    data = load_config(args.config, args.set).data  # the languages of the corpus to generate
    langs = (data.src_lang, data.tgt_lang)

    start = time.perf_counter()
    results = []
    for n in sizes:
        corpus = make_corpus(args.work_dir, n, args.seed, args.data, langs)
        how = "cached" if corpus["cached"] else f"generated in {corpus['seconds']:.1f} s"
        print(f"== {label(n)} pairs: corpus {corpus['dir']} ({how})", file=sys.stderr)
        result = run_size(args, n, corpus)
        results.append(result)
        print(json.dumps(result), flush=True)

    print()
    print_table([table_row(r) for r in results],
                ["n", *(f"{s}_s" for s in (*STAGES, "other")), "total_s", "pairs/s",
                 "peak_rss_mib", "peak_in", "peak_pss_mib"])
    done = next((r for r in results if "error" not in r), None)
    if done:
        print(f"traduire {done['commit'][:7] if done['commit'] else '?'} (package last changed "
              f"in {done['code_commit'][:7] if done['code_commit'] else '?'})"
              f"{' (modified)' if done['dirty'] else ''}; "
              f"{done['cpu']}, {done['cores']} cores, nice {done['nice']}; torch {done['torch']}, "
              f"datasets {done['datasets']}, sentencepiece {done['sentencepiece']}; "
              f"whole benchmark {time.perf_counter() - start:,.0f} s")
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
