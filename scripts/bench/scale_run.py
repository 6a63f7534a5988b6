"""A training job at WMT scale on this machine: start-up, memory, the epoch boundary,
checkpoints and resume of Transformer-base on a synthetic corpus of N pairs, with 1 and 2
processes (gloo on CPU), as `traduire train` runs them.

    python scripts/bench/scale_run.py                          # 10M pairs, this checkout
    python scripts/bench/scale_run.py --sizes 1M --code /path/to/other/checkout
    python scripts/bench/scale_run.py --tiny                   # 2k toy pairs, in a minute

The corpus is recombined from the Multi30k text as data_scale.py makes it (and cached with
it under --work-dir/corpora), then prepared once with configs/wmt14-en-fr-base.yaml's
sections (SentencePiece sampled on 1M sentences; --vocab pieces, since recombined Multi30k
text holds about 20k words: 32k pieces cannot be made of it); the preparation is not timed and
is skipped when its run directory is already prepared. `--code` names the checkout whose
traduire runs (its src/ goes first on PYTHONPATH), so two versions are measured on the same
prepared corpus; a checkout reads a run directory another prepared only where it can (the
current one converts the older encoded layout once, in its prepare).

For each world size, in a fresh training directory beside the prepared one (the data,
tokenizer and encoded splits linked, not copied):
  cold   the page cache dropped (echo 3 > /proc/sys/vm/drop_caches, where permitted; where
         not, the corpus files alone are evicted with posix_fadvise, and the output says so),
         then --steps steps with a checkpoint every --steps // 2: launch to the start of the
         first step (its batch in hand: "to_step1") and to its end ("step1_done"), the
         median step, peak RSS and PSS per rank, and each checkpoint's pause of the loop
         (Trainer._save) and its write (save_checkpoint, in whichever thread runs it)
  warm   a fresh directory, the cache warm: launch to the start and the end of the first
         (only) step, and its peak RSS (the kernel's high-water mark); then the same 1-step run
         with the Multi30k model (3+3 layers, d_model 256), whose own memory does not hide
         what opening the corpus costs ("1step_small_rss")
  resume the cold run's last checkpoint moved to 2 batches before the end of its epoch, then
         4 more steps: the time to resume (Trainer._resume) and the step that crosses into
         the next epoch against the median step
Each process runs `traduire train` through a small wrapper (written into the work directory)
that records these figures as it trains; it changes nothing of what training does.

With --big-checkpoints, instead: Transformer-big (6+6 layers, d_model 1024, 16 heads, FFN
4096, 32k shared pieces) after one Adam step, on CPU: the pause of the training loop for one
checkpoint (the checkout's way: a synchronous save where it has no CheckpointWriter) and the
write, then 5 such checkpoints averaged in a fresh process: its peak RSS (the kernel's
high-water mark) over the model's weights.

Prints one JSON line per (size, world size), then a table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, cpu_flags, cpu_model, print_table, write_tiny_corpus  # noqa: E402
from data_scale import label, make_corpus, parse_size  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "wmt14-en-fr-base.yaml"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "traduire-scale-run"
LINKED = ("data", "tokenizer", "encoded")
RESUME_BEFORE_END, RESUME_STEPS = 2, 4
# configs/multi30k-en-fr.yaml's model (3+3 layers, d_model 256), for the 1-step memory figure.
SMALL_MODEL = ["model.layers=3", "model.d_model=256", "model.heads=4", "model.ffn_dim=1024"]

# Runs `traduire train` in this process, recording what the benchmark reports into
# $SCALE_OUT/rank<RANK>.json at exit: step end times and epochs, checkpoint pauses and writes,
# the resume's duration, and peak RSS, PSS and private memory sampled every 0.1 s.
WORKER = r'''
import atexit, json, os, resource, sys, threading, time
from pathlib import Path

out = Path(os.environ["SCALE_OUT"]) / f"rank{os.environ.get('RANK', '0')}.json"
record = {"step_starts": [], "step_ends": [], "epochs": [], "epoch_batches": None,
          "pauses": [], "writes": [], "resume_s": None,
          "peak": {"Rss": 0, "Pss": 0, "Private": 0}, "param_bytes": 0}

def sample():
    while True:
        try:
            fields = {}
            with open("/proc/self/smaps_rollup") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        fields[parts[0].rstrip(":")] = int(parts[1])
            fields["Private"] = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            for key in record["peak"]:
                record["peak"][key] = max(record["peak"][key], fields.get(key, 0))
        except OSError:
            pass
        time.sleep(0.1)

threading.Thread(target=sample, daemon=True).start()

from traduire import checkpoint, cli, training

def timed(owner, name, sink):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink(time.perf_counter() - start)
    setattr(owner, name, wrapper)

timed(training.Trainer, "_save", record["pauses"].append)
timed(training.Trainer, "_resume", lambda s: record.__setitem__("resume_s", s))
for module in (checkpoint, training):  # an older training.py imported it by name
    if hasattr(module, "save_checkpoint"):
        timed(module, "save_checkpoint", lambda s: record["writes"].append(
            [round(s, 3), threading.current_thread().name]))

original_steps = training.training_steps
def steps(*args, **kwargs):
    for planned in original_steps(*args, **kwargs):
        record["epochs"].append(planned.epoch)
        record["epoch_batches"] = planned.epoch_batches
        yield planned
training.training_steps = steps

original_step = training.Trainer._train_step
def train_step(self, *args):
    if not record["param_bytes"]:
        record["param_bytes"] = sum(p.numel() * p.element_size()
                                    for p in self.model.parameters())
    record["step_starts"].append(time.time())
    result = original_step(self, *args)
    record["step_ends"].append(time.time())
    return result
training.Trainer._train_step = train_step

def save():
    record["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write_text(json.dumps(record))
atexit.register(save)
sys.argv = ["traduire", *sys.argv[1:]]
cli.main()
'''


def prepare(args: argparse.Namespace, corpus_dir: Path, run_dir: Path) -> None:
    """`traduire prepare` of the corpus with the checkout's code (skipped stages when done)."""
    sets = [f"data.dir={corpus_dir}", "data.source=files", "data.format=text",
            "data.train_prefix=train", "data.valid_prefix=val", f"data.workers={args.workers}",
            "tokenizer.input_sentence_size=1000000", f"tokenizer.vocab_size={args.vocab}",
            *args.prepare_set]
    command = [sys.executable, "-m", "traduire", "prepare", "-c", str(CONFIG), "-r",
               str(run_dir), *(a for s in sets for a in ("--set", s))]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=code_env(args), stdout=sys.stderr)
    print(f"   prepared in {time.perf_counter() - started:.0f} s (not timed)", file=sys.stderr)


def code_env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    path = [str(args.code / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def training_dir(prepared: Path, target: Path) -> Path:
    """A run directory whose data, tokenizer and encoded splits are the prepared ones."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in LINKED:
        (target / name).symlink_to(prepared / name)
    shutil.copytree(prepared / "stages", target / "stages")
    for name in ("run.json", "config.yaml"):
        shutil.copy(prepared / name, target / name)
    return target


def make_cold(prepared: Path) -> str:
    """Empty the page cache, or where that is not permitted evict the corpus's files."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError as e:
        why = e.strerror or str(e)
    for path in prepared.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return f"drop_caches not permitted ({why}): corpus files evicted with posix_fadvise"


def train(args: argparse.Namespace, run_dir: Path, world: int, steps: int, out: Path,
          extra: list[str] = (), env: dict[str, str] | None = None) -> tuple[float, list[dict]]:
    """`traduire train` under the wrapper with `world` processes; returns the launch time and
    each rank's record."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    threads = max(1, args.threads // world)
    sets = [f"train.max_steps={steps}", f"train.save_every={max(1, args.steps // 2)}",
            "train.valid_every=1000000", "train.valid_bleu=false", "train.log_every=1",
            "train.progress=false", "train.average_last=0", "train.keep_last=3",
            f"train.threads={threads}", f"train.batch_tokens={args.batch_tokens}",
            f"train.precision={args.precision}", *args.set, *extra]
    command = [str(args.work_dir / "worker.py"), "train", "-r", str(run_dir),
               *(a for s in sets for a in ("--set", s))]
    if world > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", *command]
    else:
        command = [sys.executable, *command]
    launched = time.time()
    done = subprocess.run(command, env=code_env(args, SCALE_OUT=str(out),
                                                OMP_NUM_THREADS=str(threads), **(env or {})),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{run_dir}: training failed:\n{done.stderr[-3000:]}")
    return launched, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def move_to_epoch_end(run_dir: Path, epoch_batches: int) -> int:
    """Make the newest checkpoint resume RESUME_BEFORE_END batches before its epoch's end;
    returns its step."""
    import torch

    last = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(last, weights_only=True)
    state["train_state"]["batch_in_epoch"] = max(epoch_batches - RESUME_BEFORE_END, 0)
    torch.save(state, last)
    return state["train_state"]["step"]


def step_times(record: dict) -> list[float]:
    ends = record["step_ends"]
    return [b - a for a, b in zip(ends, ends[1:])]


def measure(args: argparse.Namespace, n: int, prepared: Path, world: int) -> dict[str, Any]:
    base = args.work_dir / "train" / f"{label(n)}-{args.name}-w{world}"
    result: dict[str, Any] = {"n": n, "code": args.name, "world": world}
    mib = 1 / 1024

    cold_dir = training_dir(prepared, base / "cold")
    result["cold_cache"] = make_cold(prepared) if not args.no_drop else "not dropped (--no-drop)"
    launched, ranks = train(args, cold_dir, world, args.steps, base / "out-cold")
    result["to_first_step_cold_s"] = round(ranks[0]["step_starts"][0] - launched, 2)
    result["first_step_cold_s"] = round(ranks[0]["step_ends"][0] - launched, 2)
    steady = [t for r in ranks[:1] for t in step_times(r)]
    result["peak_rss_mib"] = [round(r["peak"]["Rss"] * mib) for r in ranks]
    result["peak_pss_mib"] = [round(r["peak"]["Pss"] * mib) for r in ranks]
    # What a rank holds beyond the weights, their gradients and Adam's two moments.
    state_mib = 4 * ranks[0]["param_bytes"] / 2**20
    result["pss_beyond_model_mib"] = [round(r["peak"]["Pss"] * mib - state_mib) for r in ranks]
    result["checkpoint_pause_s"] = [round(p, 3) for p in ranks[0]["pauses"]]
    result["checkpoint_write_s"] = ranks[0]["writes"]

    result["first_step_warm_s"], result["one_step_peak_rss_mib"] = None, []
    result["to_first_step_warm_s"], result["one_step_small_rss_mib"] = None, []
    if not args.tiny:  # the cold run's start, again: --tiny checks that the rest runs
        warm_dir = training_dir(prepared, base / "warm")
        launched, warm = train(args, warm_dir, world, 1, base / "out-warm")
        result["to_first_step_warm_s"] = round(warm[0]["step_starts"][0] - launched, 2)
        result["first_step_warm_s"] = round(warm[0]["step_ends"][0] - launched, 2)
        # The kernel's high-water mark: a short run's peak can fall between two samples.
        result["one_step_peak_rss_mib"] = [round(r["max_rss_kib"] * mib) for r in warm]
        # The same 1-step run with the Multi30k model: what the corpus costs beside a model
        # whose own memory does not hide it.
        small_dir = training_dir(prepared, base / "small")
        _, small = train(args, small_dir, world, 1, base / "out-small", SMALL_MODEL)
        result["one_step_small_rss_mib"] = [round(r["max_rss_kib"] * mib) for r in small]

    epoch_batches = ranks[0]["epoch_batches"]
    step = move_to_epoch_end(cold_dir, epoch_batches)
    _, resumed = train(args, cold_dir, world, step + RESUME_STEPS, base / "out-resume")
    record = resumed[0]
    times = step_times(record)
    steady += times
    boundary = next((i for i, (a, b) in enumerate(zip(record["epochs"], record["epochs"][1:]))
                     if b != a), None)
    result["epoch_batches"] = epoch_batches
    result["median_step_s"] = round(statistics.median(steady), 3) if steady else None
    if boundary is not None and boundary - 1 < len(times) and boundary >= 1:
        result["boundary_step_s"] = round(times[boundary], 3)
        result["boundary_vs_median"] = round(times[boundary] / result["median_step_s"], 2)
    result["resume_s"] = [round(r["resume_s"], 3) for r in resumed]
    if world > 1 and args.resume_each:
        # The same resume with every rank reading the checkpoint itself, for comparison.
        move_to_epoch_end(cold_dir, epoch_batches)
        keep = sorted((cold_dir / "checkpoints").glob("step_*.pt"))
        for extra in keep:
            if int(extra.stem.split("_")[1]) > step:
                extra.unlink()
        _, each = train(args, cold_dir, world, step + 1, base / "out-each",
                        env={"TRADUIRE_RESUME_READ": "each"})
        result["resume_each_reads_s"] = [round(r["resume_s"], 3) for r in each]
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


# Run with the checkout's code: Transformer-big's checkpoint pause and write, and the peak RSS
# of averaging 5 of its checkpoints (a process of its own: the high-water mark is its alone).
BIG = r'''
import json, resource, sys, time
from pathlib import Path
import torch
from types import SimpleNamespace
from traduire import checkpoint
from traduire.checkpoint import TrainState, training_checkpoint
from traduire.config import config_from_dict
from traduire.loading import build_model

work, mode = Path(sys.argv[1]), sys.argv[2]
paths = [work / f"step_{i:08d}.pt" for i in range(1, 6)]
if mode == "average":
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    averaged = checkpoint.average_checkpoints(paths)
    seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in averaged["model"].values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"average_s": round(seconds, 1), "weights_mib": round(weights / 2**20),
                      "rss_before_mib": round(before / 1024), "peak_rss_mib": round(peak / 1024),
                      "peak_over_weights": round(peak * 1024 / weights, 2)}))
    sys.exit()
torch.set_num_threads(2)
config = config_from_dict({"data": {"dir": str(work)},
                          "model": {"layers": 6, "d_model": 1024, "heads": 16,
                                     "ffn_dim": 4096, "share_embeddings": True}})
tokenizer = SimpleNamespace(src_vocab_size=32000, tgt_vocab_size=32000, pad_id=0)
model = build_model(config, tokenizer)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
optimizer.step()
scaler = torch.amp.GradScaler("cpu", enabled=False)
state = lambda step: training_checkpoint(model, optimizer, scaler, TrainState(step=step),
                                         [{"torch": torch.get_rng_state()}], config, "x")
pauses, writes = [], []
writer = checkpoint.CheckpointWriter() if hasattr(checkpoint, "CheckpointWriter") else None
for i, path in enumerate(paths, 1):
    start = time.perf_counter()
    if writer is None:
        checkpoint.save_checkpoint(path, state(i))
        pauses.append(time.perf_counter() - start)
        writes.append(pauses[-1])
    else:
        writer.save(path, state(i))
        pauses.append(time.perf_counter() - start)
        writer.wait()
        writes.append(writer.write_s)
    with torch.no_grad():  # the next step changes the weights the copy was taken of
        for p in model.parameters():
            p.add_(1e-4)
total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"pause_s": [round(x, 2) for x in pauses],
                  "write_s": [round(x, 2) for x in writes],
                  "checkpoint_gib": round(paths[0].stat().st_size / 2**30, 2),
                  "weights_gib": round(total / 2**30, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024)}))
'''


def big_checkpoints(args: argparse.Namespace) -> None:
    work = args.work_dir / f"big-{args.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    script = args.work_dir / "big.py"
    script.write_text(BIG)
    results = {"code": args.name, "cpu": cpu_model(), "isa": cpu_flags()}
    for mode in ("save", "average"):
        done = subprocess.run([sys.executable, str(script), str(work), mode],
                              env=code_env(args), capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"big checkpoints ({mode}) failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


def table_row(r: dict[str, Any]) -> dict[str, Any]:
    def joined(values: list) -> str:
        return "/".join(str(v) for v in values)

    def fig(value: float | None) -> str | None:
        return None if value is None else f"{value:.3g}"
    writes = [w[0] for w in r["checkpoint_write_s"]]
    return {"pairs": label(r["n"]), "code": r["code"], "ranks": r["world"],
            "to_step1_cold_s": r.get("to_first_step_cold_s"),
            "step1_done_cold_s": r["first_step_cold_s"],
            "to_step1_warm_s": r.get("to_first_step_warm_s"),
            "step1_done_warm_s": r["first_step_warm_s"], "rss_mib": joined(r["peak_rss_mib"]),
            "pss_mib": joined(r["peak_pss_mib"]), "pss-model_mib": joined(
                r["pss_beyond_model_mib"]), "1step_rss_mib": joined(r["one_step_peak_rss_mib"]),
            "1step_small_rss_mib": joined(r.get("one_step_small_rss_mib", [])),
            "median_step_s": fig(r["median_step_s"]),
            "boundary_step_s": fig(r.get("boundary_step_s")),
            "boundary/median": fig(r.get("boundary_vs_median")),
            "ckpt_pause_s": joined(r["checkpoint_pause_s"]), "ckpt_write_s": joined(writes),
            "resume_s": joined(r["resume_s"]),
            "resume_each_s": joined(r.get("resume_each_reads_s", []))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10M", help="pair counts (k = 1e3, M = 1e6)")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout to run")
    parser.add_argument("--name", help="what to call the checkout in the output (its folder)")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--steps", type=int, default=6, help="steps of the cold run")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads in all, shared by the ranks")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--vocab", type=int, default=16000, help="SentencePiece pieces")
    parser.add_argument("--workers", type=int, default=0, help="data.workers of prepare")
    parser.add_argument("--seed", type=int, default=1, help="of the synthetic corpus")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--prepared", type=Path, help="a prepared run directory to use (one "
                        "size): e.g. a copy of one another checkout prepared")
    parser.add_argument("--set", action="append", default=[], help="train override")
    parser.add_argument("--prepare-set", action="append", default=[], help="prepare override")
    parser.add_argument("--no-drop", action="store_true", help="leave the page cache alone")
    parser.add_argument("--resume-each", action="store_true",
                        help="also time a resume with every rank reading the checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the training directories")
    parser.add_argument("--big-checkpoints", action="store_true",
                        help="Transformer-big's checkpoint pause and averaging RSS instead")
    parser.add_argument("--tiny", action="store_true", help="2k toy pairs and a toy model in a "
                        "temporary work directory, the cache left alone: checks that it runs")
    args = parser.parse_args()
    tiny_dir = None
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="traduire-scale-run-"))
        args.data, args.work_dir = write_tiny_corpus(tiny_dir / "data"), tiny_dir / "work"
        args.sizes, args.vocab, args.no_drop, args.resume_each = "2k", 40, True, True
        args.steps, args.batch_tokens, args.threads = 2, 300, 2
        args.set = ["model.layers=1", "model.d_model=32", "model.heads=2", "model.ffn_dim=64",
                    "model.max_positions=64", *args.set]
        args.world_sizes = "2"  # the launcher's path; one rank is the same without it
    args.code, args.work_dir = args.code.resolve(), args.work_dir.expanduser().resolve()
    args.name = args.name or args.code.name
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "worker.py").write_text(WORKER)
    if args.big_checkpoints:
        big_checkpoints(args)
        return
    worlds = [int(w) for w in args.world_sizes.split(",")]
    results = []
    try:
        for n in (parse_size(s) for s in args.sizes.split(",") if s.strip()):
            corpus = make_corpus(args.work_dir, n, args.seed, args.data, ("en", "fr"))
            prepared = args.prepared or args.work_dir / "prepared" / f"{label(n)}-{args.name}"
            print(f"== {label(n)} pairs ({args.name}): preparing {prepared}", file=sys.stderr)
            prepare(args, Path(corpus["dir"]), prepared)
            for world in worlds:
                print(f"== {label(n)} pairs, {world} rank(s)", file=sys.stderr)
                result = {**measure(args, n, prepared, world), "corpus_sha256": corpus["sha256"],
                          "cpu": cpu_model(), "isa": cpu_flags(),
                          "cores": len(os.sched_getaffinity(0)),
                          "batch_tokens": args.batch_tokens, "vocab": args.vocab,
                          "loadavg": os.getloadavg()[0]}
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        if tiny_dir is not None:
            shutil.rmtree(tiny_dir, ignore_errors=True)
    print(f"\nCPU: {cpu_model()} ({', '.join(cpu_flags()) or 'none of avx2/avx512'}); "
          f"cache: {results[0]['cold_cache'] if results else '-'}")
    rows = [table_row(r) for r in results]
    print_table(rows, list(rows[0]) if rows else [])


if __name__ == "__main__":
    main()
