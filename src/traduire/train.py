"""The training loop: label-smoothed cross-entropy, Adam with inverse-square-root warmup,
token-budgeted batches, periodic validation and exactly resumable checkpoints.

Data parallelism: every rank computes the same global batch order; each takes its own slice of
every global batch, so the result does not depend on how many ranks share the work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch.nn.parallel import DistributedDataParallel

from traduire import distributed
from traduire.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_checkpoints,
)
from traduire.config import (
    Config,
    TrainConfig,
    config_from_dict,
    encoder_decoder_layers,
    parse_duration,
)
from traduire.data import Batch, EncodedCorpus, collate, split_batch, token_batches
from traduire.errors import CheckpointError, TraduireError
from traduire.model import Transformer, TransformerShape
from traduire.runtime import native_bf16
from traduire.tokenizer import Tokenizer

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(config: Config, tokenizer: Tokenizer) -> Transformer:
    encoder_layers, decoder_layers = encoder_decoder_layers(config.model)
    m = config.model
    return Transformer(TransformerShape(
        src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size,
        d_model=m.d_model, heads=m.heads, ffn_dim=m.ffn_dim, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, dropout=m.dropout, attention_dropout=m.attention_dropout,
        activation_dropout=m.activation_dropout, activation=m.activation, norm=m.norm,
        max_positions=m.max_positions,
        share_embeddings=m.share_embeddings, pad_id=tokenizer.pad_id))


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then decay with 1/sqrt(step) (Vaswani et al., section 5.3)."""
    step = max(step, 1)
    if step < warmup:
        return peak * step / warmup
    return peak * math.sqrt(max(warmup, 1) / step)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of `step` (1-based) under the configured schedule, warmup included."""
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt_lr(step, cfg.lr, cfg.warmup_steps)
    step = max(step, 1)
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    end = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(end - cfg.warmup_steps, 1))
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress)


# Peak dense bf16/fp16 tensor-core FLOP/s, for model FLOPs utilisation (vendor datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "V100": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS.items() if key in name), None)


def training_flops(model: Transformer, src_tokens: float, tgt_tokens: float) -> float:
    """Approximate FLOPs of forward + backward: 6 per weight per token that passes through it
    (Kaplan et al. 2020). Attention scores and their weighted sums are left out: at these
    sequence lengths they add a few percent."""
    encoder = sum(p.numel() for n, p in model.encoder.named_parameters() if "embedding" not in n)
    decoder = sum(p.numel() for n, p in model.decoder.named_parameters() if "embedding" not in n)
    output = model.decoder.embedding.weight.numel()
    return 6 * (encoder * src_tokens + (decoder + output) * tgt_tokens)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TraduireError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


@dataclass
class TrainState:
    """Where training is: enough to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    elapsed: float = 0.0  # seconds of training, summed over all runs
    best_valid_loss: float = math.inf
    best_valid_bleu: float = -1.0
    validations_without_improvement: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    bad_steps_in_a_row: int = 0


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
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(config, tokenizer).to(self.device)
        self.net = (DistributedDataParallel(self.model) if self.dist.enabled else self.model)
        if self.cfg.compile:
            self.net = torch.compile(self.net)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                                          betas=self.cfg.adam_betas, eps=self.cfg.adam_eps,
                                          weight_decay=self.cfg.weight_decay,
                                          fused=True)  # one kernel, not ~10 per tensor
        self.precision = self.cfg.precision
        if self.precision == "auto":
            self.precision = "bf16" if native_bf16(self.device) else "fp32"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        self.max_time = parse_duration(self.cfg.max_time) if self.cfg.max_time else math.inf
        self.console = Console(stderr=True)
        self.interrupted: str | None = None  # name of the signal that asked us to stop
        self.peak_flops = peak_flops(self.device)
        self.tensorboard = None

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Train until max_steps, max_epochs, max_time or early stopping; returns the final
        state. SIGINT/SIGTERM end the run at the current step with a checkpoint, and raise
        TrainingInterrupted."""
        self._resume()
        if self._done():
            self._info(f"nothing to do: training already reached its limit at step "
                       f"{self.state.step}")
            return self.state
        self._info(f"training {self.model.num_parameters():,} parameters on {self.device}"
                   + (f" x {self.dist.world_size} ranks" if self.dist.enabled else "")
                   + f", {self.precision}"
                   + (f", resuming at step {self.state.step}" if self.state.step else ""))
        with self._signals_handled(), self._metrics_file() as metrics, \
                self._progress() as progress:
            self._loop(metrics, progress)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.interrupted:
            raise TrainingInterrupted(self.interrupted, self.state.step,
                                      self._latest_checkpoint())
        return self.state

    def _loop(self, metrics, progress: Progress) -> None:
        window = _Window()
        start = time.monotonic() - self.state.elapsed
        task = progress.add_task("train", total=self.cfg.max_steps or None,
                                 completed=self.state.step)
        stop = False
        while not stop:
            epoch, batches = self.state.epoch, self._epoch_batches()
            while self.state.epoch == epoch and not stop:
                stats = self._train_step(batches[self.state.batch_in_epoch])
                self.state.batch_in_epoch += 1
                if self.state.batch_in_epoch >= len(batches):
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                self.state.elapsed = time.monotonic() - start
                window.add(stats)
                progress.update(task, completed=self.state.step)
                stop = distributed.broadcast_flag(self._done() or bool(self.interrupted),
                                                  self.device)
                step = self.state.step
                if step % self.cfg.log_every == 0 or stop:
                    self._log(window.summary(self.state, self._lr(), self._mfu), metrics,
                              progress)
                    window = _Window()
                if (step % self.cfg.valid_every == 0 or stop) and not self.interrupted:
                    stop = self._validate(metrics, progress) or stop
                if step % self.cfg.save_every == 0 or stop:
                    self._save()

    @contextlib.contextmanager
    def _signals_handled(self):
        """Turn SIGINT/SIGTERM into a request to stop after the current step."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self.interrupted:  # a second Ctrl-C: stop now, the last checkpoint stands
                raise KeyboardInterrupt
            self.interrupted = signal.Signals(signum).name
            self._info(f"{self.interrupted}: finishing step {self.state.step + 1}, then saving")

        previous = {sig: signal.signal(sig, request_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _done(self) -> bool:
        c, s = self.cfg, self.state
        return bool((c.max_steps and s.step >= c.max_steps)
                    or (c.max_epochs and s.epoch >= c.max_epochs)
                    or s.elapsed >= self.max_time
                    or (c.patience and s.validations_without_improvement >= c.patience))

    def _mfu(self, flops_per_s: float, src: float, tgt: float) -> float | None:
        if self.peak_flops is None:
            return None
        return training_flops(self.model, src, tgt) * flops_per_s / self.peak_flops

    def _epoch_batches(self) -> list[np.ndarray]:
        data = self.train_data
        return token_batches(data.src_lens, data.tgt_lens, data.usable, self.cfg.batch_tokens,
                             self.cfg.seed, self.state.epoch)

    def _train_step(self, global_batch: np.ndarray) -> dict[str, float]:
        """One optimizer step on one global batch, of which this rank takes its share."""
        self.net.train()
        data, tok = self.train_data, self.tokenizer
        # Normalise by the global batch's target tokens: every rank can count them, and the
        # gradient then does not depend on how the batch is split.
        total_tgt = int(data.tgt_lens[global_batch].sum())
        parts = split_batch(global_batch, self.dist.world_size * self.cfg.accumulate)
        mine = parts[self.dist.rank * self.cfg.accumulate:(self.dist.rank + 1)
                     * self.cfg.accumulate]
        loss_sum, src_tokens = 0.0, 0
        for i, part in enumerate(mine):
            weight = 1.0
            if len(part) == 0:  # more shards than sentences: run a zero-weight pass so that
                part, weight = global_batch[:1], 0.0  # every rank joins the gradient sync
            batch = collate(*data.pairs(part), pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id)
            batch = batch.to(self.device)
            last = i == len(mine) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:
                loss = self._loss(batch, self.cfg.label_smoothing)
                scaled = loss * weight * self.dist.world_size / total_tgt
                self.scaler.scale(scaled).backward()
            loss_sum += loss.item() * weight
            src_tokens += batch.num_src_tokens if weight else 0
        loss_sum, src_tokens = distributed.all_reduce_sum([loss_sum, src_tokens], self.device)
        return self._optimizer_step(loss_sum, total_tgt, src_tokens)

    def _loss(self, batch: Batch, label_smoothing: float) -> torch.Tensor:
        """Summed cross-entropy over the batch's real target tokens."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.net(batch.src, batch.tgt_in)
        return F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(),
                               ignore_index=self.tokenizer.pad_id, reduction="sum",
                               label_smoothing=label_smoothing)

    def _optimizer_step(self, loss_sum: float, tgt_tokens: int, src_tokens: float
                        ) -> dict[str, float]:
        self.state.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        if not math.isfinite(loss_sum):
            # A non-finite loss would poison Adam's moments: skip the update, count it.
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            self.state.bad_steps_in_a_row += 1
            if self.state.bad_steps_in_a_row >= self.cfg.max_bad_steps:
                raise TraduireError(
                    f"the loss was not finite for {self.state.bad_steps_in_a_row} steps in a "
                    f"row (step {self.state.step}); training stopped rather than learn garbage. "
                    f"Lower train.lr, use fp32 or bf16 instead of fp16, or check the data; "
                    f"the last good checkpoint is {self._latest_checkpoint()}")
            return {"loss": math.nan, "tgt_tokens": tgt_tokens, "src_tokens": src_tokens}
        self.state.bad_steps_in_a_row = 0
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "tgt_tokens": tgt_tokens, "src_tokens": src_tokens}

    def _lr(self) -> float:
        return learning_rate(self.state.step, self.cfg)

    # --- validation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate_loss(self) -> tuple[float, float]:
        """Mean per-token negative log-likelihood on the validation set, and perplexity."""
        self.model.eval()
        data, tok = self.valid_data, self.tokenizer
        nll, tokens = 0.0, 0
        batches = token_batches(data.src_lens, data.tgt_lens, data.usable,
                                self.cfg.batch_tokens, seed=0, epoch=0)
        for part in batches[self.dist.rank::self.dist.world_size]:
            batch = collate(*data.pairs(part), pad=tok.pad_id, bos=tok.bos_id,
                            eos=tok.eos_id).to(self.device)
            dtype = AUTOCAST_DTYPES.get(self.precision)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(batch.src, batch.tgt_in)
            nll += F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(),
                                   ignore_index=tok.pad_id, reduction="sum").item()
            tokens += batch.num_tgt_tokens
        nll, tokens = distributed.all_reduce_sum([nll, tokens], self.device)
        loss = nll / max(tokens, 1)
        return loss, math.exp(min(loss, 100))

    @torch.inference_mode()
    def evaluate_bleu(self) -> float:
        """BLEU of greedy (or small-beam) translations of the first validation sentences."""
        from traduire.evaluate import score
        from traduire.search import beam_search

        self.model.eval()
        data, tok = self.valid_data, self.tokenizer
        indices = data.usable[:self.cfg.valid_bleu_sentences]
        order = indices[np.argsort(data.src_lens[indices], kind="stable")]
        hypotheses: dict[int, str] = {}
        for part in np.array_split(order, max(1, len(order) // 64)):
            if len(part) == 0:
                continue
            src_ids, _ = data.pairs(part)
            src = collate(src_ids, [[] for _ in src_ids], pad=tok.pad_id, bos=tok.bos_id,
                          eos=tok.eos_id).src.to(self.device)
            nbest = beam_search(self.model, src, beam=self.cfg.valid_beam, bos=tok.bos_id,
                                eos=tok.eos_id, pad=tok.pad_id)
            texts = tok.decode_tgt([hyps[0].tokens for hyps in nbest])
            hypotheses.update(zip(part.tolist(), texts))
        references = data.texts(indices, "tgt")
        return score([hypotheses[i] for i in indices.tolist()], references)["bleu"]

    def _validate(self, metrics, progress: Progress) -> bool:
        """Validate, keep best.pt, and say whether early stopping says stop."""
        if len(self.valid_data) == 0:
            return False
        loss, ppl = self.evaluate_loss()
        record: dict[str, Any] = {"step": self.state.step, "valid_loss": round(loss, 4),
                                  "valid_ppl": round(ppl, 3)}
        if self.cfg.valid_bleu:
            bleu = self.evaluate_bleu() if self.dist.is_main else 0.0
            record["valid_bleu"] = distributed.broadcast_value(bleu, self.device)
        if self.cfg.best_metric == "bleu":
            improved = record["valid_bleu"] > self.state.best_valid_bleu
        else:
            improved = loss < self.state.best_valid_loss
        self.state.best_valid_loss = min(self.state.best_valid_loss, loss)
        self.state.best_valid_bleu = max(self.state.best_valid_bleu,
                                         record.get("valid_bleu", -1.0))
        self.state.validations_without_improvement = (
            0 if improved else self.state.validations_without_improvement + 1)
        record["best"] = improved
        if self.dist.is_main:
            progress.console.print(
                f"step {self.state.step:>7} | valid loss {loss:.3f} | ppl {ppl:.2f}"
                + (f" | bleu {record['valid_bleu']:.2f}" if "valid_bleu" in record else "")
                + (" | best" if improved else ""))
            _write_metrics(metrics, record)
            self._tensorboard(record, prefix="valid")
            if improved:
                save_checkpoint(self.run_dir / "best.pt", self._checkpoint_state())
        patience = self.cfg.patience
        if patience and self.state.validations_without_improvement >= patience:
            self._info(f"early stopping: no improvement in {patience} validations")
            return True
        return False

    # --- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "train_state": vars(self.state).copy(),
                "rng": rng, "config": self.config.to_dict(),
                "world_size": self.dist.world_size}

    def _save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_dir / f"step_{self.state.step:08d}.pt",
                            self._checkpoint_state())
            prune_checkpoints(self.checkpoint_dir, self.cfg.keep_last)
        distributed.barrier()

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint; a corrupt one is reported and the
        previous one used instead."""
        if self.dist.is_main:  # a save killed half-way leaves its temporary file behind
            for leftover in [*self.checkpoint_dir.glob(".step_*.pt.*.tmp"),
                             *self.run_dir.glob(".best.pt.*.tmp")]:
                leftover.unlink(missing_ok=True)
        found = step_checkpoints(self.checkpoint_dir)
        for path in reversed(found):
            try:
                state = load_checkpoint(path, map_location=self.device)
            except CheckpointError as e:
                self._warn(f"{e}; falling back to an earlier checkpoint")
                continue
            self._restore(state)
            return
        if found:  # starting over silently would throw away a whole run's work
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {self.checkpoint_dir} can be read; "
                "move them aside to start again, or train with --overwrite")

    def _restore(self, state: dict[str, Any]) -> None:
        saved = config_from_dict(state["config"])
        if saved.model != self.config.model:
            raise CheckpointError("checkpoint model settings differ from the config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.state = TrainState(**state["train_state"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())

    # --- output --------------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        found = step_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    def _metrics_file(self):
        if not self.dist.is_main:
            return contextlib.nullcontext()
        if self.cfg.tensorboard and self.tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TraduireError("train.tensorboard needs the tensorboard package: "
                                    "pip install 'traduire[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        return open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def _tensorboard(self, record: dict[str, Any], prefix: str) -> None:
        if self.tensorboard is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def _progress(self) -> Progress:
        enabled = self.cfg.progress and self.dist.is_main
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("step {task.completed}"), TimeElapsedColumn(),
                        console=self.console, disable=not enabled, transient=True)

    def _log(self, record: dict[str, Any], metrics, progress: Progress) -> None:
        if not self.dist.is_main:
            return
        progress.console.print(
            f"step {record['step']:>7} | epoch {record['epoch']:>3} | loss {record['loss']:.3f}"
            f" | lr {record['lr']:.2e} | {record['tok_per_s']:>8,.0f} tok/s"
            + (f" | MFU {record['mfu']:.1%}" if record.get("mfu") is not None else "")
            + (f" | {record['gpu_mem_gib']:.1f} GiB" if record.get("gpu_mem_gib") else "")
            + f" | {_clock(record['elapsed'])}")
        _write_metrics(metrics, record)
        self._tensorboard(record, prefix="train")

    def _info(self, message: str) -> None:
        if self.dist.is_main:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False,
                               soft_wrap=True)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"{signal_name} at step {step}; checkpoint saved to {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class _Window:
    """Sums over the steps between two log lines."""

    def __init__(self) -> None:
        self.loss = self.tgt = self.src = 0.0
        self.steps = 0
        self.started = time.monotonic()

    def add(self, stats: dict[str, float]) -> None:
        if math.isfinite(stats["loss"]):
            self.loss += stats["loss"]
            self.tgt += stats["tgt_tokens"]
        self.src += stats["src_tokens"]
        self.steps += 1

    def summary(self, state: TrainState, lr: float, mfu) -> dict[str, Any]:
        seconds = max(time.monotonic() - self.started, 1e-9)
        return {"step": state.step, "epoch": state.epoch + (state.batch_in_epoch > 0),
                "loss": self.loss / max(self.tgt, 1), "lr": lr,
                "tok_per_s": (self.src + self.tgt) / seconds,
                "tgt_tok_per_s": self.tgt / seconds, "elapsed": round(state.elapsed, 1),
                "skipped_steps": state.skipped_steps,
                "mfu": mfu(1 / seconds, self.src, self.tgt),
                "gpu_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if torch.cuda.is_available() else None)}


def _write_metrics(file, record: dict[str, Any]) -> None:
    if file is not None:
        file.write(json.dumps(record) + "\n")
        file.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
