"""Tests for traduire.runtime: the process settings are applied only when asked for."""

from __future__ import annotations

import os

from traduire import runtime


def test_allocator_setting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TRADUIRE_SYSTEM_MALLOC", "1")
    assert runtime.tune_allocator() is False
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    runtime.tune_onednn()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"  # the user's value wins


def test_data_preparation_runs_with_glibcs_allocator_settings(monkeypatch, tmp_path):
    """The tuned allocator keeps freed memory; data preparation gets glibc's settings back for
    its duration, and training gets the tuned ones again after it."""
    from conftest import tiny_settings, write_config, write_corpus
    from traduire import pipeline
    from traduire.config import load_config

    calls = []
    monkeypatch.delenv("TRADUIRE_SYSTEM_MALLOC", raising=False)
    monkeypatch.setattr(runtime, "_mallopt", lambda p, v: calls.append((p, v)) or True)
    monkeypatch.setattr(runtime, "_allocator_tuned", False)
    assert runtime.tune_allocator() is True
    tuned = calls[:]
    assert tuned == [(runtime._M_MMAP_MAX, 0), (runtime._M_TRIM_THRESHOLD, 2**31 - 1)]

    during = []
    real_prepare = pipeline.prepare_data

    def prepare_data(*args):
        during.append(calls[len(tuned):])
        return real_prepare(*args)

    monkeypatch.setattr(pipeline, "prepare_data", prepare_data)
    config = load_config(write_config(tmp_path / "c.yaml",
                                      tiny_settings(write_corpus(tmp_path / "data"))))
    pipeline.prepare(config, tmp_path / "run")
    assert during == [[(runtime._M_MMAP_MAX, 65536), (runtime._M_TRIM_THRESHOLD, 128 * 1024)]]
    assert calls[-2:] == tuned and runtime._allocator_tuned
    calls.clear()
    monkeypatch.setattr(runtime, "_allocator_tuned", False)  # never tuned: nothing is changed
    with runtime.default_allocator():
        pass
    assert calls == []
