"""Tests for traduire.device: the hardware probes behind `precision: auto`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from traduire import device


def test_bf16_is_native_on_ampere_and_newer_gpus_only_asking_about_the_device_in_use(
        monkeypatch):
    asked = []
    capabilities = {0: (7, 5), 1: (8, 0), 2: (9, 0)}  # Turing emulates bf16; Ampere, Hopper
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index: asked.append(index) or capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # not asked
    assert not device.native_bf16(torch.device("cuda", 0))
    assert device.native_bf16(torch.device("cuda", 1))
    assert device.native_bf16(torch.device("cuda"))  # the current device: 2
    assert asked == [0, 1, 2]


@pytest.mark.parametrize(("amx", "avx512_bf16", "native"), [(True, False, True),
                                                           (False, True, True),
                                                           (False, False, False)])
def test_bf16_on_cpu_follows_the_cpu_probes(monkeypatch, amx, avx512_bf16, native):
    monkeypatch.setattr(device, "cpu_features", lambda: {"avx2": True, "avx512f": True,
                                                          "amx": amx,
                                                          "avx512_bf16": avx512_bf16})
    assert device.native_bf16(torch.device("cpu")) is native


def test_an_avx2_capability_hides_avx512_and_amx():
    probe = ("import json; from traduire.device import cpu_features; "
             "print(json.dumps(cpu_features()))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"ATEN_CPU_CAPABILITY": "avx2", "PATH": "/usr/bin:/bin"},
                            timeout=120)
    features = json.loads(result.stdout)
    assert features == {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx": False}
