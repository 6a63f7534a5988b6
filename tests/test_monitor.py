"""Model FLOPs and MFU: the estimate against a count by hand, and the peak of every device in
the denominator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import traduire.monitor
from traduire.model import Transformer, TransformerShape
from traduire.monitor import ModelFlops, Window, embedding_tables


def tiny_model() -> Transformer:
    return Transformer(TransformerShape(src_vocab_size=10, tgt_vocab_size=10, d_model=4, heads=2,
                                        ffn_dim=8, encoder_layers=1, decoder_layers=1,
                                        max_positions=16))


def test_model_flops_match_a_count_by_hand():
    # Weights of the tiny model (d = 4, FFN 8, vocabulary 10, one layer each side, pre-norm):
    #   an attention block: q, k, v, out projections, 4 x (4*4 + 4)             =  80
    #   a feed-forward block: 4*8 + 8 + 8*4 + 4                                 =  76
    #   a layer norm: 4 + 4                                                     =   8
    #   encoder: attention + FFN + 2 norms + final norm = 80 + 76 + 16 + 8      = 180
    #   decoder: 2 attentions + FFN + 3 norms + final norm = 160 + 76 + 24 + 8  = 268
    #     of which its cross-attention's k and v projections, 2 x (4*4 + 4)     =  40
    #   output projection (the tied embedding), 10 x 4                          =  40
    # Weights that see the source tokens: 180 + 40 = 220; the target tokens: 268 - 40 + 40 = 268.
    model = tiny_model()
    assert model.num_parameters() == 40 + 180 + 268  # the embedding once: it is shared
    src, tgt = np.array([3, 5]), np.array([4, 2])
    # 6 FLOPs per weight per token: 6 * (220 * (3 + 5) + 268 * (4 + 2))       = 20,208
    weights = 6 * (220 * 8 + 268 * 6)
    # 12 * d per query-key pair per layer: encoder self 3*3 + 5*5 = 34, decoder self
    # 4*4 + 2*2 = 20, decoder cross 4*3 + 2*5 = 22: 12 * 4 * (34 + 20 + 22)   =  3,648
    attention = 12 * 4 * (34 + 20 + 22)
    assert weights == 20_208 and attention == 3_648
    assert ModelFlops(model)(src, tgt) == 23_856


def test_model_flops_grow_with_each_sentence_not_with_padding():
    flops = ModelFlops(tiny_model())
    together = flops(np.array([3, 5]), np.array([4, 2]))
    assert together == flops(np.array([3]), np.array([4])) + flops(np.array([5]), np.array([2]))


def test_embedding_tables_count_a_shared_table_once():
    shared = tiny_model()
    assert [t.shape for t in embedding_tables(shared).values()] == [(10, 4)]
    apart = Transformer(TransformerShape(src_vocab_size=12, tgt_vocab_size=10, d_model=4, heads=2,
                                         ffn_dim=8, encoder_layers=1, decoder_layers=1,
                                         max_positions=16, share_embeddings=False))
    tables = embedding_tables(apart)
    assert sorted(t.shape[0] for t in tables.values()) == [10, 12]
    assert all(tables[id(t)] is t for t in (apart.encoder.embedding.weight,
                                             apart.decoder.embedding.weight))


def window_of(flops: float, seconds: float) -> Window:
    """A window that began `seconds` before the (frozen) clock's now."""
    window = Window()
    window.add(torch.tensor(10.0), src_tokens=300, tgt_tokens=200, flops=flops)
    window.started = 1000.0 - seconds
    return window


def test_mfu_divides_by_the_peak_of_every_device(monkeypatch):
    # 4e12 FLOPs in 2 s is 2e12 FLOP/s: twice the peak of one device of 1e12 FLOP/s (the
    # numbers need not be realistic), half the peak of four. The clock is frozen, so a pause
    # of the test process cannot change the figures.
    monkeypatch.setattr(traduire.monitor, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    one_device = window_of(4e12, 2.0).summary(10.0, 200, peak=1e12, devices=1)
    four_devices = window_of(4e12, 2.0).summary(10.0, 200, peak=1e12, devices=4)
    assert one_device["mfu"] == pytest.approx(2.0, rel=1e-3)
    assert four_devices["mfu"] == pytest.approx(0.5, rel=1e-3)
    assert four_devices["tok_per_s"] == pytest.approx(250, rel=1e-3)  # (300 + 200) / 2 s
    assert (four_devices["src_tokens"], four_devices["tgt_tokens"]) == (300, 200)
    assert four_devices["loss"] == pytest.approx(0.05)  # 10 over 200 target tokens


def test_no_mfu_without_a_known_peak():
    assert window_of(1e9, 1.0).summary(10.0, 200, peak=None, devices=2)["mfu"] is None


def test_a_window_of_skipped_steps_has_no_loss_rather_than_zero():
    window = Window()
    window.add(torch.tensor(float("nan")), 10, 12, 1.0)
    window.add(torch.tensor(float("inf")), 10, 12, 1.0)
    loss_sum, counted = window.read()
    assert (loss_sum, counted) == (0.0, 0.0)
    assert window.summary(loss_sum, counted, None, 1)["loss"] is None
    window.add(torch.tensor(6.0), 10, 12, 1.0)
    assert window.summary(*window.read(), None, 1)["loss"] == pytest.approx(0.5)


# --- metrics.jsonl -----------------------------------------------------------------------------


def test_a_last_line_cut_short_by_a_crash_is_skipped_when_read_back(tmp_path):
    from traduire.errors import TraduireError
    from traduire.monitor import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.4}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # torn, then more lines
    with pytest.raises(TraduireError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_training_fsyncs_the_metrics_at_every_validation_and_checkpoint(tmp_path,
                                                                      tiny_config_path,
                                                                      monkeypatch):
    from traduire.config import load_config
    from traduire.files import AppendLog
    from traduire.pipeline import run

    synced: list[int] = []
    real_sync = AppendLog.sync
    monkeypatch.setattr(AppendLog, "sync", lambda self: (
        synced.append(sum(1 for _ in open(self.path))), real_sync(self)))
    config = load_config(tiny_config_path, ["train.max_steps=20", "train.valid_every=10",
                                            "train.save_every=5", "train.log_every=5"])
    run(config, tmp_path / "run")
    # Lines in the file at each fsync: every log and validation line is written before the
    # checkpoint of its step, so each save (steps 5, 10, 15, 20: after 1, 3, 4 and 6 lines)
    # and each validation (10, 20) finds all of them on disk.
    assert sorted(set(synced)) == [1, 3, 4, 6] and synced == sorted(synced)
