"""SentencePiece subwords: training the model on the corpus and encoding text both ways.

With `tokenizer.joint` (the default) one model covers both languages, which lets the network
share one embedding matrix between source, target and output; otherwise each side has its own.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import datasets
import sentencepiece as spm

from traduire.config import TokenizerConfig
from traduire.errors import ConfigError
from traduire.files import atomic_write_bytes


class Tokenizer:
    """Source and target SentencePiece processors (one object twice when joint)."""

    def __init__(self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor) -> None:
        self.src, self.tgt = src, tgt
        self.pad_id, self.unk_id = tgt.pad_id(), tgt.unk_id()
        self.bos_id, self.eos_id = tgt.bos_id(), tgt.eos_id()

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        joint = directory / "spm.model"
        if joint.exists():
            model = _processor(joint)
            return cls(model, model)
        return cls(_processor(directory / "spm.src.model"), _processor(directory / "spm.tgt.model"))

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        return self.src.encode(texts)

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        return self.tgt.encode(texts)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a cluster job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SentencePiece model not found")
    return spm.SentencePieceProcessor(model_file=str(path))


def train_tokenizer(train: datasets.Dataset, cfg: TokenizerConfig, out_dir: Path) -> Tokenizer:
    """Train SentencePiece on the training text and write spm.model (or spm.src/tgt.model)."""
    if cfg.joint:
        texts = itertools.chain(train["src"], train["tgt"])
        atomic_write_bytes(out_dir / "spm.model", _train_model(texts, cfg))
    else:
        atomic_write_bytes(out_dir / "spm.src.model", _train_model(iter(train["src"]), cfg))
        atomic_write_bytes(out_dir / "spm.tgt.model", _train_model(iter(train["tgt"]), cfg))
    return Tokenizer.load(out_dir)


def _train_model(sentences, cfg: TokenizerConfig) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            pad_id=cfg.pad_id, unk_id=cfg.unk_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id,
            input_sentence_size=cfg.input_sentence_size, shuffle_input_sentence=True,
            num_threads=available_cores(), minloglevel=2)
    except RuntimeError as e:
        message = " ".join(str(e).split())
        if "Vocabulary size" in message or "vocab_size" in message:
            # e.g. "Vocabulary size too high (8000). Please set it to a value <= 1234."
            raise ConfigError(f"'tokenizer.vocab_size' is too large for this corpus: "
                              f"{message.split(':')[-1].strip()}") from None
        raise ConfigError(f"SentencePiece training failed: {message}") from None
    return model.getvalue()


def encode_corpus(pairs: datasets.Dataset, tokenizer: Tokenizer, cache_file: Path
                  ) -> datasets.Dataset:
    """Add columns src_ids, tgt_ids, src_len, tgt_len (lengths without specials), batched and
    cached on disk in the run directory."""

    def encode(batch: dict) -> dict:
        src_ids, tgt_ids = tokenizer.encode_src(batch["src"]), tokenizer.encode_tgt(batch["tgt"])
        return {"src_ids": src_ids, "tgt_ids": tgt_ids,
                "src_len": [len(s) for s in src_ids], "tgt_len": [len(t) for t in tgt_ids]}

    features = datasets.Features({
        "src": datasets.Value("string"), "tgt": datasets.Value("string"),
        "src_ids": datasets.List(datasets.Value("int32")),
        "tgt_ids": datasets.List(datasets.Value("int32")),
        "src_len": datasets.Value("int32"), "tgt_len": datasets.Value("int32")})
    return pairs.map(encode, batched=True, batch_size=10_000, features=features,
                     cache_file_name=str(cache_file))
