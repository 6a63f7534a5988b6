"""Tests for traduire.kernels: each speed path computes the same function as its plain form,
and the process settings are applied only when asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from traduire import kernels
from traduire.kernels import Dropout, causal_mask, dropout, explicit_attention, top_per_row

# --- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_and_fused_attention_agree(causal):
    """CPUs take the explicit attention path, GPUs the fused kernel: same values and same
    gradients, with padding or causality."""
    gen = torch.Generator().manual_seed(19)
    q, k, v = (torch.randn(3, 4, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    if causal:
        mask = causal_mask(6, 6, torch.device("cpu"), mask)
    explicit, weights = explicit_attention(q, k, v, mask)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert weights[0, :, :, 4:].eq(0).all()
    if causal:
        assert weights[1].triu(1).eq(0).all()
    grads = torch.autograd.grad(explicit.square().sum(), (q, k, v))
    fused_grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
    for got, want in zip(grads, fused_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# --- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_a_share_p_and_scales_the_rest(p: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.rand(1001, 999, dtype=dtype) + 1  # odd size: not a multiple of four
    out = dropout(x, p, training=True)
    assert out.dtype == dtype and out.shape == x.shape
    dropped = out == 0
    # 1M Bernoulli(p) draws: the share is within 5 standard deviations of p.
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(out[~dropped], (x / (1 - p)).to(dtype)[~dropped])
    # Neighbouring elements (which share a 64-bit random draw) are independent.
    pairs = dropped.flatten()[: x.numel() // 2 * 2].view(-1, 2).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / pairs.size(0)) ** 0.5


def test_gradient_uses_the_same_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.25, training=True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.75)


def test_seeded_reproducible_and_identity_when_off() -> None:
    x = torch.randn(100, 10)
    torch.manual_seed(2)
    first = dropout(x, 0.1, training=True)
    torch.manual_seed(2)
    assert torch.equal(first, dropout(x, 0.1, training=True))
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert dropout(x, 1.0, training=True).eq(0).all()
    module = Dropout(0.1).eval()
    assert module(x) is x


# --- top-k -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "vocab", "k"), [(7, 8000, 10), (3, 1001, 4), (2, 700, 1)])
def test_top_per_row_equals_topk(rows: int, vocab: int, k: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    scores = torch.randn(rows, vocab, generator=gen) * 4
    scores[0, 5:] = float("-inf")  # a row with fewer finite entries than k + blocks
    scores[-1, ::3] = float("-inf")
    values, index = top_per_row(scores, k)
    expected = scores.topk(k, dim=1)
    torch.testing.assert_close(values, expected.values)
    torch.testing.assert_close(scores.gather(1, index), expected.values)
    finite = expected.values.isfinite()
    assert torch.equal(index[finite], expected.indices[finite])


# --- hardware and process settings -------------------------------------------------------------


def test_bf16_is_native_on_ampere_and_newer_gpus_only_asking_about_the_device_in_use(
        monkeypatch):
    asked = []
    capabilities = {0: (7, 5), 1: (8, 0), 2: (9, 0)}  # Turing emulates bf16; Ampere, Hopper
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index: asked.append(index) or capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # not asked
    assert not kernels.native_bf16(torch.device("cuda", 0))
    assert kernels.native_bf16(torch.device("cuda", 1))
    assert kernels.native_bf16(torch.device("cuda"))  # the current device: 2
    assert asked == [0, 1, 2]


@pytest.mark.parametrize(("amx", "avx512_bf16", "native"), [(True, False, True),
                                                           (False, True, True),
                                                           (False, False, False)])
def test_bf16_on_cpu_follows_the_cpu_probes(monkeypatch, amx, avx512_bf16, native):
    monkeypatch.setattr(kernels, "cpu_features", lambda: {"avx2": True, "avx512f": True,
                                                          "amx": amx,
                                                          "avx512_bf16": avx512_bf16})
    assert kernels.native_bf16(torch.device("cpu")) is native


def test_an_avx2_capability_hides_avx512_and_amx():
    probe = ("import json; from traduire.kernels import cpu_features; "
             "print(json.dumps(cpu_features()))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"ATEN_CPU_CAPABILITY": "avx2", "PATH": "/usr/bin:/bin"},
                            timeout=120)
    features = json.loads(result.stdout)
    assert features == {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx": False}


def test_allocator_setting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TRADUIRE_SYSTEM_MALLOC", "1")
    assert kernels.tune_allocator() is False
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    kernels.tune_onednn()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"  # the user's value wins


def test_data_preparation_runs_with_glibcs_allocator_settings(monkeypatch, tmp_path):
    """The tuned allocator keeps freed memory; data preparation gets glibc's settings back for
    its duration, and training gets the tuned ones again after it."""
    from conftest import tiny_settings, write_config, write_corpus
    from traduire import pipeline
    from traduire.config import load_config

    calls = []
    monkeypatch.delenv("TRADUIRE_SYSTEM_MALLOC", raising=False)
    monkeypatch.setattr(kernels, "_mallopt", lambda p, v: calls.append((p, v)) or True)
    monkeypatch.setattr(kernels, "_allocator_tuned", False)
    assert kernels.tune_allocator() is True
    tuned = calls[:]
    assert tuned == [(kernels._M_MMAP_MAX, 0), (kernels._M_TRIM_THRESHOLD, 2**31 - 1)]

    during = []
    real_prepare = pipeline.prepare_data

    def prepare_data(*args):
        during.append(calls[len(tuned):])
        return real_prepare(*args)

    monkeypatch.setattr(pipeline, "prepare_data", prepare_data)
    config = load_config(write_config(tmp_path / "c.yaml",
                                      tiny_settings(write_corpus(tmp_path / "data"))))
    pipeline.prepare(config, tmp_path / "run")
    assert during == [[(kernels._M_MMAP_MAX, 65536), (kernels._M_TRIM_THRESHOLD, 128 * 1024)]]
    assert calls[-2:] == tuned and kernels._allocator_tuned
    calls.clear()
    monkeypatch.setattr(kernels, "_allocator_tuned", False)  # never tuned: nothing is changed
    with kernels.default_allocator():
        pass
    assert calls == []
