"""The training loop: label-smoothed cross-entropy, Adam with a warmed-up learning rate,
token-budgeted batches, periodic validation, and checkpoints that resume exactly.

Data parallelism: every rank computes the same global batch order and takes its own slice of
every global batch, and the loss is normalised by the global batch's target tokens, so the
update does not depend on how many ranks share the work. Each rank draws its own dropout
masks (rank 0 continues the stream of train.seed; rank r has a stream seeded by (seed, r)),
and every rank's random state is saved, so a run resumed at the same world size continues
exactly the run it interrupted. Every rank sees each step's global loss, so all skip the same
non-finite steps, and the ranks agree after every step on whether to stop.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from traduire import distributed
from traduire.batch import (
    Batch,
    EncodedCorpus,
    PlannedStep,
    Prefetcher,
    StepPlan,
    rounded_steps,
    training_steps,
)
from traduire.checkpoint import (
    CheckpointWriter,
    TrainState,
    average_checkpoints,
    check_vocabulary,
    for_translation,
    latest_readable,
    load_checkpoint,
    prune_checkpoints,
    rank_seed,
    remove_leftovers,
    restore_training,
    rng_state,
    save_average,
    step_checkpoints,
    training_checkpoint,
    weights_digest,
)
from traduire.config import Config, parse_duration
from traduire.device import AUTOCAST_DTYPES, resolve_device, training_precision
from traduire.errors import CheckpointError, TraduireError
from traduire.evaluate import validate_bleu, validate_loss
from traduire.finetune import load_initial_weights, record_origin
from traduire.loading import build_model
from traduire.loss import token_cross_entropy
from traduire.monitor import ModelFlops, Monitor, Window, gpu_memory_gib, peak_flops
from traduire.schedule import (
    Budget,
    decision_due,
    learning_rate,
    rate_from_time,
    time_budget,
)
from traduire.tokenizer import SubwordSampler, Tokenizer


class Trainer:
    """Trains a model on an encoded corpus, writing checkpoints and metrics to a run directory."""

    def __init__(self, config: Config, run_dir: Path, tokenizer: Tokenizer,
                 train_data: EncodedCorpus, valid_data: EncodedCorpus) -> None:
        self.config, self.cfg = config, config.train
        self.run_dir, self.checkpoint_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.tokenizer, self.train_data, self.valid_data = tokenizer, train_data, valid_data
        self.device = resolve_device(self.cfg.device)
        self.dist = distributed.init(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        self.model = build_model(config, tokenizer).to(self.device)
        # Fine-tuning starts from the source's weights, on every rank alike; a run that has
        # checkpoints of its own resumes from them instead.
        self.initial = (load_initial_weights(self.model, config, tokenizer)
                        if self.cfg.init_from and not step_checkpoints(self.checkpoint_dir)
                        else None)
        if self.dist.rank > 0:
            torch.manual_seed(rank_seed(self.cfg.seed, self.dist.rank))
        self.net = (distributed.data_parallel(self.model, self.cfg.grad_reduce)
                    if self.dist.enabled else self.model)
        if self.cfg.compile:  # inputs are marked dynamic (_loss): one compilation serves all
            self.net = torch.compile(self.net)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                                          betas=self.cfg.adam_betas, eps=self.cfg.adam_eps,
                                          weight_decay=self.cfg.weight_decay,
                                          fused=True)  # one kernel, not ~10 per tensor
        self.precision = training_precision(self.cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        self.max_time = parse_duration(self.cfg.max_time) if self.cfg.max_time else math.inf
        self.monitor = Monitor(self.run_dir, self.dist.is_main, self.cfg.progress,
                               self.cfg.tensorboard)
        self.stop_request = distributed.StopRequest(self.monitor.info)
        if self.initial is not None and self.dist.is_main:
            record_origin(self.run_dir, self.initial)
            self.monitor.info(f"starting from the weights of {self.initial['checkpoint']} "
                              f"(step {self.initial['step']})")
        # Numbers computed on the device (loss, non-finite steps) are read every `read_every`
        # steps: on a CPU reading costs nothing; on a GPU it waits for the queued work.
        self.read_every = 1 if self.device.type == "cpu" else self.cfg.log_every
        self.bad_in_a_row = torch.zeros((), device=self.device)
        self.skipped = torch.zeros((), device=self.device)
        self.grad_norm: torch.Tensor | None = None  # of the last step, when it was computed
        self.flops = ModelFlops(self.model)
        self.writer = CheckpointWriter()  # rank 0's checkpoints, written in the background
        self._best_due = False  # validation improved: best.pt goes with the next save
        # (step, elapsed) from which a time budget's step rate is measured: after the first
        # step of this process past rate_from_time (a process's first step carries one-off
        # costs: allocation, compilation).
        self._rate_from: tuple[int, float] | None = None
        self._rate_from_time = rate_from_time(self.cfg)

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Train until max_steps, max_epochs, max_time or early stopping; returns the final
        state. SIGINT/SIGTERM reaching any rank end the run on every rank at the same step,
        with one checkpoint, and raise TrainingInterrupted."""
        self._resume()
        if self._done():
            self.monitor.info(f"nothing to do: training already reached its limit at step "
                              f"{self.state.step}")
            return self.state
        self.monitor.info(
            f"training {self.model.num_parameters():,} parameters on {self.device}"
            + (f" x {self.dist.world_size} ranks" if self.dist.enabled else "")
            + f", {self.precision}"
            + (f", resuming at step {self.state.step}" if self.state.step else ""))
        if self.state.budget:
            self.monitor.info(f"schedule: the time budget decided before ends at step "
                              f"{self.state.budget['end']} (decay from step "
                              f"{self.state.budget['decay_start']})")
        tok = self.tokenizer
        sampler = (SubwordSampler(tok, self.train_data, self.config.tokenizer, self.cfg.seed,
                                  min(self.cfg.max_len, self.config.model.max_positions))
                   if self.config.tokenizer.sample_alpha else None)
        plan = StepPlan(batch_tokens=self.cfg.batch_tokens, seed=self.cfg.seed, pad=tok.pad_id,
                        bos=tok.bos_id, eos=tok.eos_id, rank=self.dist.rank,
                        world_size=self.dist.world_size, accumulate=self.cfg.accumulate,
                        sample=sampler)
        steps: Iterator[PlannedStep] = training_steps(self.train_data, plan, self.state.epoch,
                                                      self.state.batch_in_epoch)
        if self.cfg.compile and self.cfg.compile_multiple > 1:
            steps = rounded_steps(steps, self.cfg.compile_multiple, tok.pad_id)
        if self.device.type == "cuda" or sampler is not None:
            # The next batches are gathered, padded and pinned while the GPU works, so that
            # the copy to the device is asynchronous. Not on a CPU: its cores all compute the
            # step, and a thread building batches beside them took more of the step (in CPU
            # time and hand-overs of Python's interpreter lock) than building them in turn;
            # except with subword sampling, whose n-best search for every sentence is work
            # of its own that would otherwise stand between one step and the next.
            steps = Prefetcher(steps, pin=self.device.type == "cuda")
        try:
            with self.stop_request, self.monitor, contextlib.closing(steps):
                stopped_by = self._loop(iter(steps))
        except BaseException:
            with contextlib.suppress(Exception):  # the error in flight is the news
                self.writer.close()
            raise
        self.writer.close()  # the last checkpoint is on disk before the run says it is done
        if stopped_by:
            raise TrainingInterrupted(signal.Signals(stopped_by).name, self.state.step,
                                      self._latest_checkpoint())
        if self.cfg.average_last:
            self._average()
        return self.state

    def _loop(self, steps: Iterator[PlannedStep]) -> int:
        """Train step after step; returns the signal that stopped the run (0: none)."""
        window, start = Window(), time.monotonic() - self.state.elapsed
        self.monitor.start(self.cfg.max_steps or None, self.state.step)
        while True:
            planned = next(steps)
            loss = self._train_step(planned.parts, int(planned.tgt_lengths.sum()))
            self.state.batch_in_epoch = planned.index + 1
            if self.state.batch_in_epoch == planned.epoch_batches:
                self.state.epoch, self.state.batch_in_epoch = planned.epoch + 1, 0
            self.state.elapsed = time.monotonic() - start
            if self._rate_from is None and self.state.elapsed >= self._rate_from_time:
                self._rate_from = (self.state.step, self.state.elapsed)
            window.add(loss, int(planned.src_lengths.sum()), int(planned.tgt_lengths.sum()),
                       self.flops(planned.src_lengths, planned.tgt_lengths))
            self.monitor.advance(self.state.step)
            done, stopped_by = self._stop_decision()
            step, stop = self.state.step, bool(done or stopped_by)
            if stopped_by and not self.stop_request.signal_number:
                self.monitor.info(f"{signal.Signals(stopped_by).name} reached another rank: "
                                  f"stopping after step {step}, then saving")
            if step % self.read_every == 0 or stop:
                self._read_bad_steps()
            if step % self.cfg.log_every == 0 or stop:
                self._log(window)
                window = Window()
            if (step % self.cfg.valid_every == 0 or stop) and not stopped_by:
                stop = self._validate() or stop
            periodic = step % self.cfg.save_every == 0 or stop
            if periodic or self._best_due:
                self._save(periodic)
            if stop:
                return stopped_by

    def _train_step(self, parts: list[tuple[Batch, float]], total_tgt: int) -> torch.Tensor:
        """One optimizer step on this rank's share of a global batch; returns the global
        batch's summed loss as a tensor on the device (not read here: reading waits for the
        GPU)."""
        self.net.train()
        if self.dist.enabled:  # the ranks agree on stopping while the step computes
            self._agreement = distributed.Agreement(
                [int(self.state.elapsed >= self.max_time), self.stop_request.signal_number,
                 int(decision_due(self.cfg, self.state.step, self.state.elapsed))])
        loss_sum = torch.zeros((), device=self.device)
        for i, (batch, weight) in enumerate(parts):
            batch = batch.to(self.device)
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:
                loss = self._loss(batch, self.cfg.label_smoothing)
                # Normalised by the global batch's target tokens: the gradient then does not
                # depend on how the batch is split between ranks and passes.
                self.scaler.scale(loss * weight * self.dist.world_size / total_tgt).backward()
            loss_sum = loss_sum + loss.detach() * weight
        # Summed over the ranks, so that every rank sees the same loss and skips the same
        # steps: a rank that updated while another skipped would leave the replicas different.
        distributed.sum_on_device(loss_sum)
        self._optimizer_step(loss_sum)
        return loss_sum

    def _loss(self, batch: Batch, label_smoothing: float) -> torch.Tensor:
        """Summed cross-entropy over the batch's real target tokens."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if self.cfg.compile:  # any batch size and length: compiled once, not once per shape
            for tensor, dim in itertools.product((batch.src, batch.tgt_in), (0, 1)):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.net(batch.src, batch.tgt_in)
        # Nothing reads the logits after the loss: their gradient is written over them.
        return token_cross_entropy(logits, batch.tgt_out, self.tokenizer.pad_id,
                                   label_smoothing, reuse_logits=True)

    def _optimizer_step(self, loss_sum: torch.Tensor) -> None:
        """Update the weights, unless the loss or the gradients are not finite: such a step
        would poison Adam's moments, so it is skipped (on the device, without waiting for it)
        and counted."""
        self.state.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.state.step, self.cfg, self._budget())
        bad = ~torch.isfinite(loss_sum)
        self.grad_norm = None
        if self.cfg.clip_norm > 0 or self.state.step % self.cfg.log_every == 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
            if self.cfg.clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(),
                                                     self.cfg.clip_norm, self.grad_norm)
        if not self.scaler.is_enabled():  # fp16's scaler skips non-finite gradients itself
            self.optimizer.found_inf = bad.float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += bad
        self.bad_in_a_row = (self.bad_in_a_row + 1) * bad

    def _read_bad_steps(self) -> None:
        """Read the skipped-step counts from the device (the same on every rank: they count
        steps whose global loss was not finite)."""
        skipped, in_a_row = int(self.skipped.item()), int(self.bad_in_a_row.item())
        self.state.skipped_steps, self.state.bad_steps_in_a_row = skipped, in_a_row
        if in_a_row >= self.cfg.max_bad_steps:
            raise TraduireError(
                f"the loss was not finite for {in_a_row} steps in a row (step "
                f"{self.state.step}); training stopped rather than learn garbage. Lower "
                f"train.lr, use fp32 or bf16 instead of fp16, or check the data; the last good "
                f"checkpoint is {self._latest_checkpoint()}")

    def _stop_decision(self) -> tuple[int, int]:
        """Whether to stop after this step, and the signal that asked for it (0: none), the
        same on every rank. Step, epoch and validations are the same on every rank; the clock
        and signals are not: the ranks agree on them through the Agreement started with the
        step, which has run while the step computed (a signal or the time limit reached during
        a step stops the run after the next one). A time budget not yet decided is decided
        first (its end may be this step), by the same agreement."""
        if not self.dist.enabled:
            if decision_due(self.cfg, self.state.step, self.state.elapsed):
                self._decide_budget()
            return int(self._done()), self.stop_request.signal_number
        out_of_time, stopped_by, budget_due = self._agreement.result()
        # The step budget's part of decision_due is the same on every rank: no need to wait.
        if budget_due or decision_due(self.cfg, self.state.step, 0.0):
            self._decide_budget()
        return int(self._done(clock=False) or out_of_time), stopped_by

    def _decide_budget(self) -> None:
        """Fix a time budget's end from the step rate measured since `_rate_from` (rank 0's,
        seen by every rank), and record it: from now on the schedule decays
        towards it, training stops there, and a resumed run keeps it."""
        if self.state.budget is not None:
            return
        s = self.state
        first_step, first_elapsed = self._rate_from or (0, 0.0)
        if s.step > first_step and s.elapsed > first_elapsed:
            rate = (s.step - first_step) / (s.elapsed - first_elapsed)
        else:  # decided before any step measured (a step budget's decay came first)
            rate = s.step / max(s.elapsed, 1e-9)
        rate = distributed.broadcast_value(rate)
        budget = time_budget(self.cfg, s.step, distributed.broadcast_value(s.elapsed), rate)
        s.budget = vars(budget).copy()
        self.monitor.schedule_record({"step": s.step, "schedule": "budget",
                                      "steps_per_s": round(rate, 4), **s.budget})
        self.monitor.info(f"schedule: at {rate:.3g} steps/s the time budget ends at step "
                          f"{budget.end}; the learning rate decays from step "
                          f"{budget.decay_start}")

    def _budget(self) -> Budget | None:
        """The decided time budget of a budget schedule (None: the step budget's, if any)."""
        return Budget(**self.state.budget) if self.state.budget else None

    def _done(self, clock: bool = True) -> bool:
        c, s = self.cfg, self.state
        return bool((c.max_steps and s.step >= c.max_steps)
                    or (s.budget and s.step >= s.budget["end"])
                    or (c.max_epochs and s.epoch >= c.max_epochs)
                    or (clock and s.elapsed >= self.max_time)
                    or (c.patience and s.validations_without_improvement >= c.patience))

    # --- logging and validation ----------------------------------------------------------------

    def _log(self, window: Window) -> None:
        """Write a log line: rank 0 only (the window holds global figures on every rank)."""
        if not self.dist.is_main:
            return
        loss_sum, counted = window.read()
        record = {"step": self.state.step,
                  "epoch": self.state.epoch + (self.state.batch_in_epoch > 0),
                  "lr": learning_rate(self.state.step, self.cfg, self._budget()),
                  **window.summary(loss_sum, counted, peak_flops(self.device),
                                   self.dist.world_size),
                  "grad_norm": (round(float(self.grad_norm.item()), 4)
                                if self.grad_norm is not None else None),
                  "elapsed": round(self.state.elapsed, 1),
                  "skipped_steps": self.state.skipped_steps, "gpu_mem_gib": gpu_memory_gib()}
        self.monitor.train_record(record)

    def _validate(self) -> bool:
        """Validate, keep best.pt, and say whether early stopping says stop."""
        if len(self.valid_data) == 0:
            return False
        loss, ppl = validate_loss(self.model, self.valid_data, self.tokenizer,
                                  self.cfg.batch_tokens, self.precision, self.device)
        record: dict[str, Any] = {"step": self.state.step, "valid_loss": round(loss, 4),
                                  "valid_ppl": round(ppl, 3)}
        if self.cfg.valid_bleu:
            bleu = (validate_bleu(self.model, self.valid_data, self.tokenizer,
                                  self.cfg.valid_bleu_sentences, self.cfg.valid_beam)
                    if self.dist.is_main else 0.0)
            record["valid_bleu"] = distributed.broadcast_value(bleu)
        s = self.state
        if self.cfg.best_metric == "bleu":
            improved = record["valid_bleu"] > s.best_valid_bleu
        else:
            improved = loss < s.best_valid_loss
        s.best_valid_loss = min(s.best_valid_loss, loss)
        s.best_valid_bleu = max(s.best_valid_bleu, record.get("valid_bleu", -1.0))
        s.validations_without_improvement = 0 if improved else s.validations_without_improvement + 1
        record["best"] = improved
        self.monitor.valid_record(record)
        self._best_due = improved  # saved with this step's checkpoint: one copy for both
        if self.cfg.patience and s.validations_without_improvement >= self.cfg.patience:
            self.monitor.info(f"early stopping: no improvement in {self.cfg.patience} "
                              "validations")
            return True
        return False

    def _average(self) -> None:
        """Write average.pt, the mean of the last checkpoints, if it validates better than
        best.pt (or there is no validation set). The last checkpoints of a short run can span
        much of its learning, and then their mean is worse than its newest member: the choice
        is made on the validation set, never assumed. Every rank takes part (validation is
        shared); rank 0 reads the checkpoints and hands the mean to the others."""
        paths = step_checkpoints(self.checkpoint_dir)[-self.cfg.average_last:]
        if not paths:
            return
        # Rank 0 reads the checkpoints (their weights only); the others receive the mean.
        averaged = average_checkpoints(paths) if self.dist.is_main else None
        if len(self.valid_data):
            model = distributed.broadcast_state(averaged["model"] if averaged else None)
            averaged = averaged or {"model": model}
        names = f"{len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name})"
        keep = True
        if len(self.valid_data):
            trained = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(averaged["model"])
            loss, _ = validate_loss(self.model, self.valid_data, self.tokenizer,
                                    self.cfg.batch_tokens, self.precision, self.device)
            self.model.load_state_dict(trained)
            keep = loss < self.state.best_valid_loss
            self.monitor.info(f"the mean of {names}: valid loss {loss:.3f} against best.pt's "
                              f"{self.state.best_valid_loss:.3f}"
                              + ("" if keep else "; average.pt not written, best.pt is used"))
        if keep and self.dist.is_main:
            save_average(self.run_dir / "average.pt", averaged)
            self.monitor.info(f"average.pt: the mean of {names}")

    # --- checkpoints ---------------------------------------------------------------------------

    def _save(self, periodic: bool = True) -> None:
        """Write a periodic checkpoint and, if validation just improved, best.pt (what
        translating needs only), from one copy (every rank takes part: each one's random
        state goes in it). The loop pauses while rank 0 copies the state to host memory; the
        writes go on in the background (CheckpointWriter)."""
        rng = distributed.all_gather(rng_state(self.device))
        best = self.run_dir / "best.pt" if self._best_due else None
        self._best_due = False
        if self.dist.is_main:
            state = training_checkpoint(self.model, self.optimizer, self.scaler, self.state,
                                        rng, self.config, self.tokenizer.fingerprint())
            if periodic:
                self.writer.save(self.checkpoint_dir / f"step_{self.state.step:08d}.pt", state,
                                 then=lambda: prune_checkpoints(self.checkpoint_dir,
                                                                self.cfg.keep_last),
                                 best=best)
            else:
                self.writer.save(best, for_translation(state))
            self.monitor.sync()
        distributed.barrier()

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint, the same one on every rank.

        Rank 0 chooses it (a damaged one is reported and the one before it used) and reads
        it; the others receive it by broadcast, so the shared filesystem serves one reader
        and a node that sees another file, or none, still trains the same state. With
        TRADUIRE_RESUME_READ=each, every rank reads the file rank 0 chose. Either way the
        ranks then compare a hash of their weights and step, and stop with one line naming
        those that differ, rather than train different models from then on."""
        if self.dist.is_main:
            remove_leftovers(self.run_dir)
        found, error = None, None
        if self.dist.is_main:
            try:
                found = latest_readable(self.checkpoint_dir, "cpu", self.monitor.warn)
            except CheckpointError as e:
                error = e
        name, message = distributed.broadcast_object(
            (found[0].name if found else None, str(error) if error else None))
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(message)
        if name is None:
            return
        saved = found[1] if found else None
        if os.environ.get("TRADUIRE_RESUME_READ", "broadcast") == "each":
            if saved is None:
                saved = load_checkpoint(self.checkpoint_dir / name)
        else:
            saved = distributed.broadcast_state(saved)
        # Weights trained on other pieces would go on training into garbage.
        check_vocabulary(saved, self.tokenizer, self.checkpoint_dir, self.run_dir / "tokenizer")
        self.state = restore_training(saved, self.model, self.optimizer, self.scaler,
                                      self.config, self.dist.rank, self.dist.world_size,
                                      self.device)
        del saved
        self.skipped.fill_(self.state.skipped_steps)
        self.bad_in_a_row.fill_(self.state.bad_steps_in_a_row)
        if self.dist.enabled:
            distributed.check_same(weights_digest(self.model, self.state.step),
                                   f"weights or step after loading {name}")

    def _latest_checkpoint(self) -> Path | None:
        with contextlib.suppress(Exception):  # a failed write is reported on its own
            self.writer.wait()
        found = step_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT, SIGTERM or SIGHUP after saving a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"{signal_name} at step {step}; checkpoint saved to {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
