"""What a training run reports: log lines on the console, the same as JSON in
RUN/metrics.jsonl (and TensorBoard if asked), a progress bar, throughput and model FLOPs
utilisation (MFU). Only rank 0 reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from traduire.errors import TraduireError
from traduire.files import AppendLog
from traduire.model import Transformer

# Peak dense bf16/fp16 tensor-core FLOP/s of one device, for MFU (vendor datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "V100": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS.items() if key in name), None)


def embedding_tables(model: Transformer) -> dict[int, torch.nn.Parameter]:
    """The token embedding tables by parameter id: one table when the encoder and decoder share
    it. The decoder's is also the output projection."""
    tables = (model.encoder.embedding.weight, model.decoder.embedding.weight)
    return {id(table): table for table in tables}


class ModelFlops:
    """Model FLOPs of one forward and backward pass over sentences of given lengths (tokens,
    EOS included; padding is not the model's work and is not counted).

    Weights: 6 FLOPs per weight per token through it (2 forward, 4 backward; Kaplan et al.
    2020). Encoder weights, and the keys-and-values projection of each decoder layer's
    cross-attention (it projects the encoder output), see the source tokens; the other decoder
    weights and the output projection see the target tokens. Embedding lookups are free;
    biases and layer norms count like weights (a rounding error).

    Attention: q k^T and the weighted sum of v are 2 * q_len * k_len * d_model FLOPs each
    forward, so 12 * d_model * q_len * k_len per layer for training, for every sentence: the
    encoder's self-attention (src x src), the decoder's self-attention (tgt x tgt, the full
    square, as explicit attention computes it; a fused causal kernel on a GPU skips about half
    of it, some 0.2% of the total for Transformer-base at 30 tokens a sentence) and its
    cross-attention (tgt x src).

    For a batch of sentences with source lengths s_i and target lengths t_i:
      6 * (N_enc + N_kv) * sum(s_i) + 6 * (N_dec - N_kv + N_out) * sum(t_i)
      + 12 * d_model * (L_enc * sum(s_i^2) + L_dec * sum(t_i^2 + t_i * s_i))
    """

    def __init__(self, model: Transformer) -> None:
        shape = model.shape
        embeddings = embedding_tables(model)
        cross_kv = [p for layer in model.decoder.layers
                    for p in layer.cross_attn.kv_proj.parameters()]
        self.source_side = sum(p.numel() for p in model.encoder.parameters()
                               if id(p) not in embeddings) + sum(p.numel() for p in cross_kv)
        self.target_side = sum(p.numel() for p in model.decoder.parameters()
                               if id(p) not in embeddings) - sum(p.numel() for p in cross_kv)
        self.target_side += model.decoder.embedding.weight.numel()  # the output projection
        self.layers = (shape.encoder_layers, shape.decoder_layers)
        self.d_model = shape.d_model

    def __call__(self, src_lengths: np.ndarray, tgt_lengths: np.ndarray) -> float:
        src, tgt = np.asarray(src_lengths, np.float64), np.asarray(tgt_lengths, np.float64)
        weights = 6 * (self.source_side * src.sum() + self.target_side * tgt.sum())
        pairs = (self.layers[0] * (src * src).sum()
                 + self.layers[1] * ((tgt * tgt).sum() + (tgt * src).sum()))
        return float(weights + 12 * self.d_model * pairs)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut short by a crash is skipped; a bad
    line elsewhere is an error naming it."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was torn
                break
            raise TraduireError(f"{path}:{number}: not a JSON record") from None
    return records


class Monitor:
    """Console, metrics file, TensorBoard and progress bar of one training run."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.metrics: AppendLog | None = None
        self.tensorboard = None
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("step {task.completed}"), TimeElapsedColumn(),
                                 console=self.console, disable=not (progress and enabled),
                                 transient=True)
        self._task = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TraduireError("train.tensorboard needs the tensorboard package: "
                                    "pip install 'traduire[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.metrics = AppendLog(Path(run_dir) / "metrics.jsonl")

    def __enter__(self) -> Monitor:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def start(self, total_steps: int | None, step: int) -> None:
        self._task = self.progress.add_task("train", total=total_steps, completed=step)

    def advance(self, step: int) -> None:
        if self._task is not None:
            self.progress.update(self._task, completed=step)

    def train_record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.progress.console.print(
            f"step {record['step']:>7} | epoch {record['epoch']:>3} | loss "
            + (f"{record['loss']:.3f}" if record["loss"] is not None else "-")
            + f" | lr {record['lr']:.2e} | {record['tok_per_s']:>8,.0f} tok/s"
            + (f" | MFU {record['mfu']:.1%}" if record.get("mfu") is not None else "")
            + (f" | {record['gpu_mem_gib']:.1f} GiB" if record.get("gpu_mem_gib") else "")
            + f" | {clock(record['elapsed'])}", highlight=False)
        self._write(record, "train")

    def schedule_record(self, record: dict[str, Any]) -> None:
        """A decision of the learning-rate schedule (schedule.py), kept in metrics.jsonl."""
        if self.enabled:
            self._write(record, "schedule")
            self.sync()

    def valid_record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.progress.console.print(
            f"step {record['step']:>7} | valid loss {record['valid_loss']:.3f} | ppl "
            f"{record['valid_ppl']:.2f}"
            + (f" | bleu {record['valid_bleu']:.2f}" if "valid_bleu" in record else "")
            + (" | best" if record["best"] else ""), highlight=False)
        self._write(record, "valid")
        self.sync()

    def sync(self) -> None:
        """Make the metrics written so far durable (at validations and checkpoints)."""
        if self.metrics is not None:
            self.metrics.sync()

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False,
                               soft_wrap=True)

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record))
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])


class Window:
    """Sums over the steps between two log lines, of global figures (every rank's share of
    each step together). Losses stay tensors on the training device until `read`, so that no
    step waits for the GPU."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None  # summed loss of the steps with a finite one
        self.counted: torch.Tensor | None = None  # global target tokens of those steps
        self.tgt = self.src = self.flops = 0.0
        self.steps = 0
        self.started = time.monotonic()

    def add(self, loss: torch.Tensor, src_tokens: int, tgt_tokens: int, flops: float) -> None:
        """A step: its summed loss, its source and target tokens and its model FLOPs."""
        finite = torch.isfinite(loss)
        kept, counted = torch.where(finite, loss, 0.0), finite * float(tgt_tokens)
        self.loss = kept if self.loss is None else self.loss + kept
        self.counted = counted if self.counted is None else self.counted + counted
        self.src += src_tokens
        self.tgt += tgt_tokens
        self.flops += flops
        self.steps += 1

    def read(self) -> list[float]:
        """[summed loss, target tokens it is over], read from the device."""
        if self.loss is None or self.counted is None:
            return [0.0, 0.0]
        return [float(self.loss.item()), float(self.counted.item())]

    def summary(self, loss_sum: float, counted: float, peak: float | None, devices: int
                ) -> dict[str, Any]:
        """Mean loss per target token, tokens and throughput, and MFU: the model's FLOPs per
        second over the peak of all `devices` together (`peak` is one device's)."""
        seconds = max(time.monotonic() - self.started, 1e-9)
        return {"loss": loss_sum / counted if counted else None,  # None: every step skipped
                "src_tokens": int(self.src), "tgt_tokens": int(self.tgt),
                "tok_per_s": (self.src + self.tgt) / seconds,
                "tgt_tok_per_s": self.tgt / seconds,
                "mfu": self.flops / seconds / (peak * devices) if peak else None}


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def gpu_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)
