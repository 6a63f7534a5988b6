"""Tests for traduire.training: learning, the learning-rate schedule, and exact resumption."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_pair, tiny_settings, write_config, write_corpus
from traduire.batch import collate
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import TrainConfig, load_config
from traduire.loading import build_model
from traduire.pipeline import run
from traduire.training import learning_rate

PAD, BOS, EOS = 0, 2, 3


# --- learning ----------------------------------------------------------------------------------


def test_tiny_model_overfits_twenty_pairs(tiny_config_path):
    config = load_config(tiny_config_path, ["model.dropout=0"])
    vocab = 40
    tokenizer = SimpleNamespace(src_vocab_size=vocab, tgt_vocab_size=vocab, pad_id=PAD)
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    assert model.shape.d_model == 32 and len(model.encoder.layers) == 1
    assert model.shape.dropout == 0.0

    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 8, (20,), generator=gen).tolist()
    src = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]
    tgt = [[(t + 3) % (vocab - 4) + 4 for t in reversed(s)] for s in src]  # reverse and shift
    batch = collate(src, tgt, pad=PAD, bos=BOS, eos=EOS)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    model.train()
    first = None
    for _ in range(200):
        logits = model(batch.src, batch.tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0  # about log(40) at the start
    assert loss.item() < 0.02
    model.eval()
    with torch.no_grad():
        predicted = model(batch.src, batch.tgt_in).argmax(-1)
    real = batch.tgt_out != PAD
    assert torch.equal(predicted[real], batch.tgt_out[real])


# --- learning rate -----------------------------------------------------------------------------


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    return learning_rate(step, TrainConfig(lr=peak, warmup_steps=warmup,
                                           schedule="inverse_sqrt"))


def test_inverse_sqrt_lr_warmup_and_decay():
    peak, warmup = 0.004, 100
    # Linear warmup from ~0 to the peak.
    assert inverse_sqrt_lr(1, peak, warmup) == pytest.approx(peak / 100)
    assert inverse_sqrt_lr(50, peak, warmup) == pytest.approx(peak / 2)
    assert inverse_sqrt_lr(100, peak, warmup) == pytest.approx(peak)
    # Then 1/sqrt(step) decay: 4x the steps, half the rate.
    assert inverse_sqrt_lr(400, peak, warmup) == pytest.approx(peak / 2)
    assert inverse_sqrt_lr(10_000, peak, warmup) == pytest.approx(peak / 10)
    rates = [inverse_sqrt_lr(s, peak, warmup) for s in range(1, 1000)]
    assert max(rates) == pytest.approx(peak)
    assert rates.index(max(rates)) == warmup - 1
    assert all(a < b for a, b in zip(rates[:warmup - 1], rates[1:warmup]))
    assert all(a > b for a, b in zip(rates[warmup - 1:], rates[warmup:]))
    # Step 0 (before the first update) is not zero, nor is a schedule without warmup.
    assert inverse_sqrt_lr(0, peak, warmup) > 0
    assert inverse_sqrt_lr(1, peak, 0) == pytest.approx(peak)
    assert inverse_sqrt_lr(4, peak, 0) == pytest.approx(peak / 2)


# --- resuming ----------------------------------------------------------------------------------

N = 10  # run B stops here and resumes; run A goes straight to 2N


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def valid_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["valid_loss"] for r in read_metrics(run_dir) if "valid_loss" in r}


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    last = step_checkpoints(run_dir / "checkpoints")[-1]
    assert last.name == f"step_{step:08d}.pt"
    state = load_checkpoint(last)
    assert state["train_state"]["step"] == step
    return state["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def corpus(workspace) -> Path:
    return write_corpus(workspace / "data")


@pytest.fixture(scope="module")
def straight_run(workspace, corpus) -> Path:
    """Run A: 2N steps in one go (dropout on, so the RNG state matters on resume)."""
    torch.set_num_threads(1)
    path = write_config(workspace / "a.yaml", tiny_settings(corpus, train={"max_steps": 2 * N}))
    state = run(load_config(path), workspace / "run_a")
    assert state.step == 2 * N
    return workspace / "run_a"


def test_training_reduces_loss_and_uses_the_schedule(straight_run):
    losses = train_losses(straight_run)
    assert sorted(losses) == [5, 10, 15, 20]
    assert losses[20] < losses[5]
    valid = valid_losses(straight_run)
    assert sorted(valid) == [10, 20] and valid[20] < valid[10]
    for record in read_metrics(straight_run):
        if "lr" in record:
            assert record["lr"] == pytest.approx(inverse_sqrt_lr(record["step"], 0.003, 10))
    assert (straight_run / "best.pt").is_file()
    best = load_checkpoint(straight_run / "best.pt")
    assert best["train_state"]["best_valid_loss"] == pytest.approx(valid[20], abs=1e-4)


def test_resume_gives_the_same_weights_and_losses(workspace, corpus, straight_run):
    path = write_config(workspace / "b.yaml", tiny_settings(corpus, train={"max_steps": N}))
    run_b = workspace / "run_b"
    state = run(load_config(path), run_b)
    assert state.step == N
    assert [p.name for p in step_checkpoints(run_b / "checkpoints")] == [f"step_{N:08d}.pt"]
    state = run(load_config(path, [f"train.max_steps={2 * N}"]), run_b)
    assert state.step == 2 * N

    assert_same_weights(final_weights(straight_run, 2 * N), final_weights(run_b, 2 * N))
    losses_a, losses_b = train_losses(straight_run), train_losses(run_b)
    assert sorted(losses_b) == sorted(losses_a)
    for step, loss in losses_a.items():
        assert losses_b[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    assert valid_losses(run_b) == valid_losses(straight_run)


def test_resume_falls_back_from_a_corrupt_checkpoint(workspace, corpus, straight_run, capsys):
    half = N // 2
    path = write_config(workspace / "c.yaml", tiny_settings(
        corpus, train={"max_steps": N, "save_every": half}))
    run_c = workspace / "run_c"
    run(load_config(path), run_c)
    checkpoints = step_checkpoints(run_c / "checkpoints")
    assert [p.name for p in checkpoints] == [f"step_{half:08d}.pt", f"step_{N:08d}.pt"]
    newest = checkpoints[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 3])
    capsys.readouterr()

    state = run(load_config(path, [f"train.max_steps={2 * N}", f"train.save_every={N}"]), run_c)
    err = capsys.readouterr().err
    assert newest.name in err and "falling back" in err
    assert f"resuming at step {half}" in err
    assert state.step == 2 * N
    assert_same_weights(final_weights(straight_run, 2 * N), final_weights(run_c, 2 * N))
    # The corrupt checkpoint was written again, readable this time.
    assert load_checkpoint(newest)["train_state"]["step"] == N


def test_gradient_accumulation_matches_one_pass(workspace, corpus):
    """Splitting each batch into two passes gives the same update (dropout off)."""
    weights = []
    for accumulate in (1, 2):
        path = write_config(workspace / f"acc{accumulate}.yaml", tiny_settings(
            corpus, model={"dropout": 0.0}, train={"max_steps": 4, "accumulate": accumulate}))
        run(load_config(path), workspace / f"run_acc{accumulate}")
        weights.append(final_weights(workspace / f"run_acc{accumulate}", 4))
    d = 32
    for name in weights[0]:
        a, b = weights[0][name], weights[1][name]
        # Softmax ignores a bias added to every key, so the key biases' true gradient is zero
        # and Adam turns float noise in it into full-size steps of random sign: skip them.
        if name.endswith("self_attn.qkv_proj.bias"):
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        elif name.endswith("cross_attn.kv_proj.bias"):
            a, b = a[d:], b[d:]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    losses = [train_losses(workspace / f"run_acc{accumulate}") for accumulate in (1, 2)]
    assert losses[0].keys() == losses[1].keys() == {4}
    assert math.isclose(losses[0][4], losses[1][4], rel_tol=1e-5)


# --- the budget schedule and subword sampling, resumed ---------------------------------------
# Run B of these stops at the end of the first epoch (train.max_epochs=1, 14 steps of the
# tiny corpus), without touching the schedule's budget, and resumes to 2N.

BUDGET = {"max_steps": 2 * N, "schedule": "budget", "min_lr": 1e-4}  # decays over steps 16-20
SAMPLING = {"sample_alpha": 0.5, "sample_nbest": 8, "sample_target": True}


def interrupted_and_resumed(workspace: Path, corpus: Path, name: str, **sections: dict) -> Path:
    torch.set_num_threads(1)  # as straight_run: bit-equal sums need one intra-op thread
    path = write_config(workspace / f"{name}.yaml", tiny_settings(corpus, **sections))
    first = run(load_config(path, ["train.max_epochs=1"]), workspace / name)
    assert 10 < first.step < 2 * N and first.epoch == 1
    assert run(load_config(path), workspace / name).step == 2 * N
    return workspace / name


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def budget_run(workspace, corpus) -> Path:
    torch.set_num_threads(1)
    path = write_config(workspace / "budget.yaml", tiny_settings(corpus, train=BUDGET))
    assert run(load_config(path), workspace / "budget").step == 2 * N
    return workspace / "budget"


def test_a_step_budget_decays_to_min_lr_and_resumes_exactly(workspace, corpus, budget_run):
    lrs = {r["step"]: r["lr"] for r in read_metrics(budget_run) if "lr" in r}
    assert lrs[10] == lrs[15] == 0.003 and lrs[20] == pytest.approx(1e-4)
    resumed = interrupted_and_resumed(workspace, corpus, "budget_b", train=BUDGET)
    assert_equal_weights(final_weights(budget_run, 2 * N), final_weights(resumed, 2 * N))


class FakeClock:
    """time.monotonic for training.py: `step` seconds further at every call (one per step)."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_a_time_budget_is_decided_once_recorded_and_kept_on_resume(workspace, corpus,
                                                                   monkeypatch):
    import traduire.training

    torch.set_num_threads(1)
    train = {**BUDGET, "max_steps": 0, "max_time": "20s"}
    straight = write_config(workspace / "time_a.yaml", tiny_settings(corpus, train=train))
    monkeypatch.setattr(traduire.training, "time", FakeClock(1.0))
    # A second a step: decided 8 s in (halfway to the decay, which starts 16 s in), at the rate
    # measured from 4 s on, 1 step/s: 12 steps left.
    assert run(load_config(straight), workspace / "time_a").step == 20
    decisions = [r for r in read_metrics(workspace / "time_a") if r.get("schedule")]
    assert decisions == [{"step": 8, "schedule": "budget", "steps_per_s": 1.0, "warmup": 10,
                          "decay_start": 16, "end": 20}]
    assert load_checkpoint(workspace / "time_a" / "best.pt")["train_state"]["budget"] == {
        "warmup": 10, "decay_start": 16, "end": 20}

    monkeypatch.setattr(traduire.training, "time", FakeClock(1.0))
    path = write_config(workspace / "time_b.yaml", tiny_settings(corpus, train=train))
    assert run(load_config(path, ["train.max_epochs=1"]), workspace / "time_b").step == 14
    # Resumed four times as fast, with more time: estimated again, it would end much later.
    monkeypatch.setattr(traduire.training, "time", FakeClock(0.25))
    state = run(load_config(path, ["train.max_time=60s"]), workspace / "time_b")
    assert state.step == 20 and state.budget == {"warmup": 10, "decay_start": 16, "end": 20}
    assert [r for r in read_metrics(workspace / "time_b") if r.get("schedule")] == decisions
    assert_equal_weights(final_weights(workspace / "time_a", 20),
                         final_weights(workspace / "time_b", 20))


@pytest.fixture(scope="module")
def sampling_run(workspace, corpus) -> Path:
    torch.set_num_threads(1)
    path = write_config(workspace / "sampling.yaml", tiny_settings(
        corpus, tokenizer=SAMPLING, train=BUDGET))
    assert run(load_config(path), workspace / "sampling").step == 2 * N
    return workspace / "sampling"


def test_subword_sampling_changes_training_and_resumes_exactly(workspace, corpus, budget_run,
                                                              sampling_run):
    sampled, best = final_weights(sampling_run, 2 * N), final_weights(budget_run, 2 * N)
    assert not all(torch.equal(sampled[name], best[name]) for name in best)
    resumed = interrupted_and_resumed(workspace, corpus, "sampling_b", tokenizer=SAMPLING,
                                      train=BUDGET)
    assert_equal_weights(sampled, final_weights(resumed, 2 * N))
    losses = train_losses(sampling_run)
    assert {step: train_losses(resumed)[step] for step in (5, 10, 20)} == {
        step: losses[step] for step in (5, 10, 20)}


def test_validation_and_translation_use_the_best_segmentation(sampling_run, monkeypatch):
    import sentencepiece as spm

    from traduire.evaluate import validate_loss
    from traduire.pipeline import open_encoded
    from traduire.tokenizer import Tokenizer
    from traduire.translate import Translator

    config = load_config(sampling_run / "config.yaml")
    tokenizer = Tokenizer.load(sampling_run / "tokenizer")
    model = build_model(config, tokenizer)
    model.load_state_dict(final_weights(sampling_run, 2 * N))
    valid = open_encoded(sampling_run, "valid", max_len=config.model.max_positions)
    loss, _ = validate_loss(model, valid, tokenizer, 256, "fp32", torch.device("cpu"))
    assert valid_losses(sampling_run)[2 * N] == round(loss, 4)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a segmentation was sampled")

    monkeypatch.setattr(spm.SentencePieceProcessor, "nbest_encode", no_sampling)
    translator = Translator.load(sampling_run)
    assert len(translator.translate(["a dog runs", "the big cat sleeps here"])) == 2


# --- schedules, precision, early stopping, validation BLEU, averaging ----------------------------


def train_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decaying_schedules_warm_up_then_reach_min_lr(schedule, tiny_config_path):
    cfg = load_config(tiny_config_path, [f"train.schedule={schedule}", "train.lr=1e-3",
                                         "train.warmup_steps=10", "train.decay_steps=110",
                                         "train.min_lr=1e-5"]).train
    lrs = [learning_rate(step, cfg) for step in range(1, 131)]
    assert lrs[4] == pytest.approx(5e-4)  # linear warmup
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 9
    decay = lrs[9:110]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises after warmup
    assert lrs[109] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-5)
    # A quarter of the way through the decay the two shapes differ.
    share = 0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75
    assert learning_rate(35, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * share)


def test_bf16_autocast_training_on_cpu_lowers_the_loss(tmp_path, tiny_config_path):
    config = load_config(tiny_config_path, ["train.precision=bf16", "train.max_steps=40",
                                            "train.log_every=10", "train.valid_every=40"])
    run(config, tmp_path / "run")
    losses = [r["loss"] for r in train_records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_on_native_hardware(tmp_path, tiny_config_path, capsys,
                                                        monkeypatch, native, expected):
    import traduire.device

    monkeypatch.setattr(traduire.device, "native_bf16", lambda device: native)
    config = load_config(tiny_config_path, ["train.precision=auto", "train.max_steps=2"])
    run(config, tmp_path / "run")
    assert f"parameters on cpu, {expected}" in capsys.readouterr().err


# --- which validation keeps best.pt, and when patience stops -----------------------------------


def write_disagreeing_corpus(directory: Path) -> Path:
    """A corpus on which validation BLEU and validation loss disagree, by construction.

    Training: 16 pairs, learned by heart within a few dozen steps. Validation: 8 of those
    pairs first (validation BLEU reads only these, with valid_bleu_sentences=8), then the same
    8 sources with references in letters the training text never shows, which the tokenizer
    maps to <unk>. Learning the training pairs drives BLEU on the first 8 towards 100, and the
    probability of <unk>, never a training target, down: the validation loss, most of whose
    tokens are those <unk>s, rises from the first validation on."""
    rng = random.Random(0)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < 16:
        pair = make_pair(rng)
        if pair not in pairs:
            pairs.append(pair)
    foreign = [(src, "ω ψ ω ψ ω ψ ω ψ" + " ψ" * k) for k in (1, 2, 3) for src, _ in pairs[:8]]
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, chosen in (("train", pairs), ("val", pairs[:8] + foreign)):
        for lang, column in (("en", 0), ("fr", 1)):
            (directory / f"{prefix}.{lang}").write_text(
                "".join(pair[column] + "\n" for pair in chosen), encoding="utf-8")
    return directory


def disagreeing_settings(directory: Path, **train: object) -> dict:
    """Fast, deterministic learning by heart: no dropout or label smoothing, a word-level
    vocabulary, a nearly constant learning rate."""
    return tiny_settings(directory, tokenizer={"vocab_size": 64}, model={"dropout": 0.0},
                         train={"label_smoothing": 0.0, "lr": 0.01, "warmup_steps": 5,
                                "schedule": "linear", "decay_steps": 1000, "max_steps": 200,
                                "valid_every": 10, "save_every": 10, "keep_last": 100,
                                "log_every": 10, **train})


def validations(run_dir: Path) -> list[dict]:
    return [r for r in train_records(run_dir) if "valid_loss" in r]


def improvements(values: list[float], higher_is_better: bool) -> list[bool]:
    """For each validation, whether it beat every one before it (the first always does)."""
    flags, best = [], None
    for value in values:
        better = best is None or (value > best if higher_is_better else value < best)
        flags.append(better)
        best = value if better else best
    return flags


def stop_by_patience(flags: list[bool], patience: int) -> int | None:
    """The index of the validation at which `patience` validations in a row have not
    improved, or None."""
    without = 0
    for i, improved in enumerate(flags):
        without = 0 if improved else without + 1
        if without >= patience:
            return i
    return None


@pytest.fixture(scope="module")
def disagreeing_corpus(workspace) -> Path:
    return write_disagreeing_corpus(workspace / "disagreeing")


def test_best_pt_holds_the_weights_of_the_best_bleu_when_bleu_picks(workspace,
                                                                    disagreeing_corpus):
    settings = disagreeing_settings(disagreeing_corpus, valid_bleu=True, valid_bleu_sentences=8,
                                    best_metric="bleu", patience=2)
    run_dir = workspace / "by-bleu"
    state = run(load_config(write_config(workspace / "by-bleu.yaml", settings)), run_dir)
    records = validations(run_dir)
    steps = [r["step"] for r in records]
    bleus, losses = [r["valid_bleu"] for r in records], [r["valid_loss"] for r in records]
    flags = improvements(bleus, higher_is_better=True)
    best_step = steps[max(i for i, better in enumerate(flags) if better)]
    # The construction works: BLEU and loss point at different steps, and BLEU reached a
    # value later validations could not beat.
    assert max(bleus) > 50
    assert best_step != steps[losses.index(min(losses))]
    assert best_step != steps[-1]
    assert [r["best"] for r in records] == flags

    best = load_checkpoint(run_dir / "best.pt")
    assert best["train_state"]["step"] == best_step
    assert best["train_state"]["best_valid_bleu"] == max(bleus)
    assert_same_weights(best["model"],
                        load_checkpoint(run_dir / "checkpoints" / f"step_{best_step:08d}.pt")
                        ["model"])
    last = load_checkpoint(step_checkpoints(run_dir / "checkpoints")[-1])["model"]
    assert any(not torch.equal(best["model"][k], last[k]) for k in last)
    # Patience counts validations without a better BLEU: the run stopped at the second.
    stopped = stop_by_patience(flags, 2)
    assert stopped is not None and state.step == steps[stopped] == steps[-1] < 200
    assert state.validations_without_improvement == 2


def test_early_stopping_counts_validations_whose_loss_did_not_improve(workspace,
                                                                      disagreeing_corpus):
    settings = disagreeing_settings(disagreeing_corpus, valid_every=5, patience=2)
    run_dir = workspace / "by-loss"
    state = run(load_config(write_config(workspace / "by-loss.yaml", settings)), run_dir)
    records = validations(run_dir)
    steps, losses = [r["step"] for r in records], [r["valid_loss"] for r in records]
    flags = improvements(losses, higher_is_better=False)
    assert [r["best"] for r in records] == flags
    stopped = stop_by_patience(flags, 2)
    assert stopped is not None, losses  # the validation loss rises by construction
    assert state.step == steps[stopped] == steps[-1] < 200
    assert state.validations_without_improvement == 2
    assert not any(r["step"] > state.step for r in train_records(run_dir))
    best_step = steps[losses.index(min(losses))]
    assert load_checkpoint(run_dir / "best.pt")["train_state"]["step"] == best_step


# --- TensorBoard, torch.compile, fp16 ----------------------------------------------------------


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path, tiny_config_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(tiny_config_path, ["train.tensorboard=true", "train.max_steps=4",
                                            "train.log_every=1", "train.valid_every=2"])
    run(config, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = train_records(tmp_path / "run")
    for prefix, key in (("train", "loss"), ("train", "lr"), ("valid", "valid_loss"),
                        ("valid", "valid_ppl")):
        logged = [(r["step"], r[key]) for r in records if key in r]
        assert len(logged) == (4 if prefix == "train" else 2)
        scalars = [(e.step, e.value) for e in events.Scalars(f"{prefix}/{key}")]
        assert [step for step, _ in scalars] == [step for step, _ in logged]
        assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert "train/step" not in events.Tags()["scalars"]


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, tiny_config_path,
                                                             monkeypatch):
    import sys

    from traduire.errors import TraduireError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    config = load_config(tiny_config_path, ["train.tensorboard=true", "train.max_steps=1"])
    with pytest.raises(TraduireError, match=r"pip install 'traduire\[tensorboard\]'"):
        run(config, tmp_path / "run")


def same_shape_corpus(directory: Path) -> Path:
    """72 copies of one pair: every batch has the same shape, so a compiled model is compiled
    once, not once per batch shape."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 72), ("val", 4)):
        (directory / f"{prefix}.en").write_text("the big dog runs here\n" * n, encoding="utf-8")
        (directory / f"{prefix}.fr").write_text("le grand chien court ici\n" * n,
                                                encoding="utf-8")
    return directory


def test_compiled_model_trains_with_the_losses_of_the_eager_one(tmp_path, monkeypatch):
    """train.compile: the model goes through torch.compile, and training computes the same
    losses and weights. Inductor's C++ code generation takes minutes on a small CPU, so the
    test has dynamo and AOT autograd trace the model (what traduire's code must allow) and
    runs the traced graphs as they are (the aot_eager backend)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend=counting_backend))
    data = same_shape_corpus(tmp_path / "data")
    losses, weights = {}, {}
    for compiled in (False, True):
        # A large Adam epsilon: the key bias's gradient is zero in exact arithmetic (softmax
        # ignores it) and float noise otherwise, which the compiled model's lengths (rounded
        # up to train.compile_multiple) change; Adam's first steps would move it by lr * sign.
        settings = tiny_settings(data, data={"dedupe": False}, tokenizer={"vocab_size": 20},
                                 model={"dropout": 0.0},
                                 train={"max_steps": 3, "log_every": 1, "valid_every": 3,
                                        "save_every": 3, "compile": compiled,
                                        "adam_eps": 1e-3})
        run_dir = tmp_path / f"run-{compiled}"
        run(load_config(write_config(tmp_path / f"{compiled}.yaml", settings)), run_dir)
        losses[compiled] = [r["loss"] for r in train_records(run_dir) if "loss" in r]
        weights[compiled] = final_weights(run_dir, 3)
        assert bool(graphs) == compiled
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert_same_weights(weights[True], weights[False])


def test_fp16_on_cpu_scales_the_loss_and_trains_like_fp32(tmp_path, tiny_config_path):
    losses, saved = {}, {}
    for precision in ("fp32", "fp16"):
        config = load_config(tiny_config_path, [f"train.precision={precision}",
                                                "train.max_steps=6", "train.log_every=1",
                                                "model.dropout=0", "train.save_every=6"])
        run(config, tmp_path / precision)
        losses[precision] = [r["loss"] for r in train_records(tmp_path / precision)
                             if "loss" in r]
        saved[precision] = load_checkpoint(step_checkpoints(tmp_path / precision /
                                                            "checkpoints")[-1])
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=2e-3)
    assert losses["fp16"][-1] < losses["fp16"][0]
    # fp16 keeps a loss scale (and resumes with it); fp32 has none.
    assert saved["fp16"]["scaler"]["scale"] > 1 and saved["fp32"]["scaler"] == {}
    assert saved["fp16"]["train_state"]["skipped_steps"] == 0


def test_average_command_writes_the_mean_of_the_last_checkpoints(tmp_path, tiny_config_path):
    from typer.testing import CliRunner

    from traduire.cli import app

    run(load_config(tiny_config_path, ["train.max_steps=30"]), tmp_path / "run")
    last_two = step_checkpoints(tmp_path / "run" / "checkpoints")[-2:]
    out = tmp_path / "avg.pt"
    result = CliRunner().invoke(app, ["average", "-r", str(tmp_path / "run"), "--last", "2",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    averaged = load_checkpoint(out)["model"]
    a, b = (load_checkpoint(p)["model"] for p in last_two)
    name = "decoder.layers.0.ffn.linear1.weight"
    assert not torch.equal(a[name], b[name])
    torch.testing.assert_close(averaged[name], (a[name] + b[name]) / 2)


def judge_average(monkeypatch, shift: float) -> list[float]:
    """Make the validation that judges average.pt (the one after the three periodic ones of a
    30-step run) report its true loss shifted by `shift`; returns the true losses."""
    import traduire.training as training

    real, losses = training.validate_loss, []

    def shifted(model, *args, **kwargs):
        loss, ppl = real(model, *args, **kwargs)
        losses.append(loss)
        return (loss + shift, ppl) if len(losses) > 3 else (loss, ppl)

    monkeypatch.setattr(training, "validate_loss", shifted)
    return losses


def test_average_last_writes_the_mean_that_translate_then_uses(tmp_path, tiny_config_path,
                                                               monkeypatch):
    from traduire.checkpoint import default_checkpoint

    losses = judge_average(monkeypatch, -100.0)  # the average validates better
    config = load_config(tiny_config_path, ["train.max_steps=30", "train.average_last=2"])
    run(config, tmp_path / "run")
    assert len(losses) == 4
    last_two = step_checkpoints(tmp_path / "run" / "checkpoints")[-2:]
    assert [p.name for p in last_two] == ["step_00000020.pt", "step_00000030.pt"]
    averaged = load_checkpoint(tmp_path / "run" / "average.pt")
    a, b = (load_checkpoint(p)["model"] for p in last_two)
    for name, weight in averaged["model"].items():
        torch.testing.assert_close(weight, (a[name] + b[name]) / 2)
    assert default_checkpoint(tmp_path / "run") == tmp_path / "run" / "average.pt"
    # The average was judged with its own weights, and training's weights were put back.
    assert losses[3] != losses[2]
    with pytest.raises(Exception, match="cannot exceed 'train.keep_last'"):
        load_config(tiny_config_path, ["train.average_last=6", "train.keep_last=5"])


def test_an_average_that_validates_worse_than_best_pt_is_not_written(tmp_path,
                                                                      tiny_config_path,
                                                                      monkeypatch):
    """average.pt is chosen on the validation set: the mean of checkpoints from early in a run
    can be worse than best.pt, and then translate keeps using best.pt."""
    from traduire.checkpoint import default_checkpoint

    losses = judge_average(monkeypatch, +100.0)
    config = load_config(tiny_config_path, ["train.max_steps=30", "train.average_last=2"])
    run(config, tmp_path / "run")
    assert len(losses) == 4  # steps 10, 20, 30 and the average
    assert not (tmp_path / "run" / "average.pt").exists()
    assert default_checkpoint(tmp_path / "run") == tmp_path / "run" / "best.pt"


def test_compiled_model_takes_batches_of_every_shape_with_one_compilation(tmp_path,
                                                                           monkeypatch):
    """train.compile on batches of many shapes: their lengths rounded up to a multiple of
    train.compile_multiple and marked dynamic, so that the model is compiled once, not once
    per shape, and trains with the eager model's losses (the padding changes nothing). The
    graphs are traced and run as they are (aot_eager), as in the test above."""
    import torch._dynamo

    from traduire import training

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs, shapes = [], set()

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend=counting_backend))
    loss = training.Trainer._loss

    def recording_loss(self, batch, *args):
        shapes.add((tuple(batch.src.shape), tuple(batch.tgt_in.shape)))
        return loss(self, batch, *args)

    monkeypatch.setattr(training.Trainer, "_loss", recording_loss)
    torch._dynamo.reset()
    data = write_corpus(tmp_path / "data")
    losses = {}
    for compiled in (False, True):
        settings = tiny_settings(data, model={"dropout": 0.0},
                                 train={"max_steps": 6, "log_every": 1, "valid_every": 6,
                                        "save_every": 6, "compile": compiled,
                                        "batch_tokens": 256})
        run_dir = tmp_path / f"run-{compiled}"
        shapes.clear()
        run(load_config(write_config(tmp_path / f"{compiled}.yaml", settings)), run_dir)
        losses[compiled] = [r["loss"] for r in train_records(run_dir) if "loss" in r]
    assert len({src for src, _ in shapes}) >= 3 and len(shapes) >= 4  # batches of many shapes
    assert all(src[1] % 8 == 0 and tgt[1] % 8 == 0 for src, tgt in shapes)
    assert len(graphs) == 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
