"""GPU checks: mixed precision, fused attention kernels, the decoding cache, beam search and an
fp16 training step, all on CUDA. Skipped where CUDA is unavailable (CI and the usual dev
machine); scripts/gpu_check.sh runs them on a GPU machine.

Run with `-rP` to see the report of which scaled-dot-product-attention backends ran.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traduire.batch import EncodedCorpus
from traduire.config import load_config
from traduire.model import Transformer, TransformerShape
from traduire.training import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

PAD, UNK, BOS, EOS = 0, 1, 2, 3
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 checks compare against the CPU or a full forward: keep TF32 off while they run."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def build(vocab: int = 1000, d_model: int = 256, heads: int = 4, ffn_dim: int = 1024,
          layers: int = 2, dropout: float = 0.0, seed: int = 0, **kwargs) -> Transformer:
    """A small Transformer with the benchmark config's head size (256 / 4 = 64)."""
    torch.manual_seed(seed)
    return Transformer(TransformerShape(
        src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=d_model, heads=heads,
        ffn_dim=ffn_dim, encoder_layers=layers, decoder_layers=layers, dropout=dropout,
        max_positions=256, **kwargs))


def padded_batch(lengths: list[int], vocab: int, seed: int, device=CUDA) -> torch.Tensor:
    """Right-padded ids (>= 4) of the given lengths, each followed by EOS."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((len(lengths), max(lengths) + 1), PAD)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(4, vocab, (n,), generator=gen)
        out[i, n] = EOS
    return out.to(device)


def teacher_forcing_batch(vocab: int, seed: int = 1):
    """src, tgt_in, tgt_out on the GPU, with padding on both sides (as in training)."""
    src = padded_batch([17, 9, 30, 4, 22, 12, 25, 8], vocab, seed)
    tgt = padded_batch([15, 11, 28, 5, 20, 14, 23, 9], vocab, seed + 1)
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
    tgt_in = tgt_in.masked_fill(tgt_in == EOS, PAD)
    return src, tgt_in, tgt


def loss_of(model: Transformer, src, tgt_in, tgt_out, dtype: torch.dtype | None
            ) -> torch.Tensor:
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(src, tgt_in)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                           label_smoothing=0.1)


# --- mixed precision -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_forward_backward_is_finite(precision):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = build().to(CUDA).train()
    src, tgt_in, tgt_out = teacher_forcing_batch(model.shape.tgt_vocab_size)
    loss = loss_of(model, src, tgt_in, tgt_out, dtype)
    loss.backward()
    assert torch.isfinite(loss), f"{precision}: loss {loss.item()}"
    assert 4.0 < loss.item() < 12.0  # near log(1000) for a fresh model
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{precision}: non-finite gradients in {bad}"
    assert sum(p.grad.norm() ** 2 for p in model.parameters()) > 0

    # The same weights in fp32 give about the same loss: autocast changes rounding, not math.
    with torch.no_grad():
        reference = loss_of(model.eval(), src, tgt_in, tgt_out, None)
        low = loss_of(model, src, tgt_in, tgt_out, dtype)
    assert abs(low.item() - reference.item()) < 2e-2 * reference.item()


# --- the decoding cache and beam search ------------------------------------------------------


@torch.no_grad()
def test_incremental_decoding_matches_full_forward():
    model = build(layers=3).to(CUDA).eval()
    vocab = model.shape.tgt_vocab_size
    src = padded_batch([12, 5, 19, 9], vocab, seed=3)
    tgt = torch.cat([torch.full((4, 1), BOS, device=CUDA),
                     padded_batch([15, 15, 15, 15], vocab, seed=4)[:, :-1]], dim=1)
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, i:i + 1], memory, src_mask, cache) for i in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == tgt.size(1)


def test_beam_search_on_cuda_matches_cpu():
    from traduire.search import beam_search, greedy

    torch.manual_seed(5)
    model = Transformer(TransformerShape(src_vocab_size=64, tgt_vocab_size=64, d_model=32,
                                         heads=2, ffn_dim=64, encoder_layers=2,
                                         decoder_layers=2, dropout=0.0)).eval()
    with torch.no_grad():  # peaky distributions: near-ties (which rounding could flip) are rare
        model.decoder.embedding.weight.mul_(3.0)
    src = padded_batch([7, 3, 11, 5, 9, 1], 64, seed=6, device="cpu")
    special = dict(bos=BOS, eos=EOS, pad=PAD)
    for beam in (1, 4):
        on_cpu = beam_search(model, src, beam=beam, nbest=beam, **special)
        on_gpu = beam_search(model.to(CUDA), src.to(CUDA), beam=beam, nbest=beam, **special)
        model.cpu()
        assert [[h.tokens for h in hyps] for hyps in on_gpu] == \
            [[h.tokens for h in hyps] for hyps in on_cpu], f"beam {beam}"
        for g, c in zip(on_gpu, on_cpu):
            for hg, hc in zip(g, c):
                assert math.isclose(hg.logprob, hc.logprob, rel_tol=1e-4, abs_tol=1e-4)
    assert [h.tokens for h in greedy(model.to(CUDA), src.to(CUDA), **special)] == \
        [h.tokens for h in greedy(model.cpu(), src, **special)]


# --- training steps through the Trainer -----------------------------------------------------


def random_corpus(n: int, vocab: int, rng: np.random.Generator) -> EncodedCorpus:
    src = [rng.integers(4, vocab, rng.integers(3, 20)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, vocab, rng.integers(3, 20)).tolist() for _ in range(n)]
    return EncodedCorpus(datasets.Dataset.from_dict({
        "src": [" ".join(map(str, s)) for s in src],
        "tgt": [" ".join(map(str, t)) for t in tgt],
        "src_ids": src, "tgt_ids": tgt,
        "src_len": [len(s) for s in src], "tgt_len": [len(t) for t in tgt]}))


def cuda_trainer(run_dir: Path, overrides: list[str]) -> Trainer:
    """A Trainer on CUDA for a 2-layer model over random token ids, 3 steps unless overridden."""
    vocab = 200
    rng = np.random.default_rng(0)
    config = load_config(None, [
        "data.dir=unused", "tokenizer.vocab_size=200", "model.layers=2", "model.d_model=64",
        "model.heads=2", "model.ffn_dim=128", "model.max_positions=64", "train.device=cuda",
        "train.batch_tokens=1024", "train.max_steps=3", "train.warmup_steps=2",
        "train.valid_every=3", "train.save_every=3", "train.log_every=1",
        "train.progress=false", *overrides])
    tokenizer = SimpleNamespace(src_vocab_size=vocab, tgt_vocab_size=vocab, pad_id=PAD,
                                bos_id=BOS, eos_id=EOS)
    return Trainer(config, run_dir, tokenizer, random_corpus(300, vocab, rng),
                   random_corpus(40, vocab, rng))


def test_trainer_fp16_grad_scaler_steps_are_finite(tmp_path: Path):
    trainer = cuda_trainer(tmp_path, ["train.precision=fp16"])
    assert trainer.device.type == "cuda" and trainer.scaler.is_enabled()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    state = trainer.train()

    assert state.step == 3 and state.skipped_steps == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 3 and all(math.isfinite(r["loss"]) for r in train_records)
    assert all(r["gpu_mem_gib"] and r["gpu_mem_gib"] > 0 for r in train_records)
    valid = [r for r in records if "valid_loss" in r]
    assert valid and math.isfinite(valid[-1]["valid_loss"])
    scale = trainer.scaler.get_scale()
    assert math.isfinite(scale) and scale > 0
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    # GradScaler may skip an overflowing first step; not all three may be skipped.
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), \
        f"no step updated the weights (scale {scale})"
    print(f"\nfp16 trainer: losses {[round(r['loss'], 3) for r in train_records]}, "
          f"valid {valid[-1]['valid_loss']}, final scale {scale}")


def test_bf16_steps_never_wait_for_the_gpu_and_skip_a_non_finite_step(tmp_path: Path,
                                                                       monkeypatch):
    """A training step queues its work without a host-device synchronisation (CUDA's sync
    debug mode makes one an error): the batch comes from pinned memory, the loss and the
    skipped-step count stay on the device until a log line, and a non-finite step is skipped
    by the fused optimizer on the device. Clipping is on, so the gradient norm is taken every
    step."""
    trainer = cuda_trainer(tmp_path, ["train.precision=bf16", "train.clip_norm=1.0",
                                      "train.max_steps=8", "train.log_every=4",
                                      "train.valid_every=8", "train.save_every=8"])
    assert trainer.read_every == 4
    real_loss, real_step = Trainer._loss, Trainer._train_step

    def nan_at_step_3(self, batch, label_smoothing):
        value = real_loss(self, batch, label_smoothing)
        return value * float("nan") if self.state.step + 1 == 3 else value

    def step_without_waiting(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "_loss", nan_at_step_3)
    monkeypatch.setattr(Trainer, "_train_step", step_without_waiting)
    state = trainer.train()
    assert state.step == 8 and state.skipped_steps == 1 and state.bad_steps_in_a_row == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 8]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


# --- fused attention kernels (last: a faulting kernel would poison the CUDA context) ---------


def _backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items()
            if hasattr(SDPBackend, attr)}


def _try(fn) -> tuple[bool, str]:
    """Run fn; on failure say why, preferring the warning in which torch names the reason a
    kernel was ruled out (e.g. "Flash attention does not support non-null attn_mask")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            torch.cuda.synchronize()
            return True, "ok"
        except RuntimeError as e:  # "No available kernel", or a kernel refusing the inputs
            reasons = [str(w.message).strip() for w in caught]
            reasons = [r for r in reasons if "not support" in r or "requires" in r] or reasons
            text = reasons[0] if reasons else (str(e).strip() or type(e).__name__)
            return False, "FAILED: " + " ".join(text.split())[:200]


def test_fused_attention_backends_run_the_model():
    """Which SDPA kernels can run the model's own forward/backward in bf16. The encoder and
    cross-attention pass a boolean padding mask, the decoder's self-attention only
    is_causal=True; flash attention takes no explicit mask, so the padding masks may rule it
    out for the model even though it runs the same shapes unmasked or with is_causal=True."""
    from torch.nn.attention import sdpa_kernel

    model = build(layers=3).to(CUDA).train()
    src, tgt_in, tgt_out = teacher_forcing_batch(model.shape.tgt_vocab_size)
    heads, head_dim = model.shape.heads, model.shape.d_model // model.shape.heads
    q, k, v = (torch.randn(8, heads, 31, head_dim, device=CUDA, dtype=torch.bfloat16)
               for _ in range(3))

    def model_step():
        model.zero_grad(set_to_none=True)
        loss_of(model, src, tgt_in, tgt_out, torch.bfloat16).backward()

    report: dict[str, dict[str, str]] = {}
    works: dict[str, bool] = {}
    losses: dict[str, float] = {}
    for name, backend in _backends().items():
        row = {}
        with sdpa_kernel([backend]):
            ok, why = _try(model_step)
            works[name] = ok
            row["model fwd+bwd (bool masks)"] = why
            if ok:
                with torch.no_grad():
                    losses[name] = loss_of(model.eval(), src, tgt_in, tgt_out,
                                           torch.bfloat16).item()
                model.train()
            row["no mask"] = _try(lambda: F.scaled_dot_product_attention(q, k, v))[1]
            row["is_causal=True"] = _try(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))[1]
        report[name] = row
    print("\nSDPA backends, bf16, head_dim", head_dim)
    for name, row in report.items():
        print(f"  {name:>9}: " + " | ".join(f"{what}: {why}" for what, why in row.items()))
    print("SDPA_REPORT " + json.dumps({n: works[n] for n in works}))

    fused = [n for n in ("flash", "efficient", "cudnn") if works.get(n)]
    assert fused, f"no fused SDPA kernel runs the model: {report}"
    if "math" in losses:  # every kernel that runs computes the same loss
        for name in fused:
            assert abs(losses[name] - losses["math"]) < 2e-2 * losses["math"], losses
