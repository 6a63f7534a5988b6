"""SentencePiece subwords: training the model on the corpus and encoding text both ways.

With `tokenizer.joint` (the default) one model covers both languages, which lets the network
share one embedding matrix between source, target and output; otherwise each side has its own.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import sentencepiece as spm

from traduire.config import TokenizerConfig
from traduire.errors import ConfigError, TraduireError
from traduire.files import atomic_write_bytes
from traduire.runtime import processes

if TYPE_CHECKING:
    from traduire.batch import EncodedCorpus


class Tokenizer:
    """Source and target SentencePiece processors (one object twice when joint).

    With a `Vocabulary` (a tokenizer imported from a Marian model, say) the ids are that
    vocabulary's: SentencePiece cuts the text into pieces and each piece is looked up by name,
    as the toolkit that made the model does. Otherwise the ids are SentencePiece's own."""

    def __init__(self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor,
                 vocabulary: Vocabulary | None = None) -> None:
        self.src, self.tgt, self.vocabulary = src, tgt, vocabulary
        if vocabulary is None:
            self.pad_id, self.unk_id = tgt.pad_id(), tgt.unk_id()
            self.bos_id, self.eos_id = tgt.bos_id(), tgt.eos_id()
        else:
            self.pad_id, self.unk_id = vocabulary.pad_id, vocabulary.unk_id
            self.bos_id, self.eos_id = vocabulary.bos_id, vocabulary.eos_id
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        joint = directory / "spm.model"
        vocabulary = Vocabulary.load(directory / VOCABULARY_FILE)
        if joint.exists():
            model = _processor(joint)
            return cls(model, model, vocabulary)
        return cls(_processor(directory / "spm.src.model"), _processor(directory / "spm.tgt.model"),
                   vocabulary)

    @property
    def src_vocab_size(self) -> int:
        if self.vocabulary is not None:
            return len(self.vocabulary.src)
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        if self.vocabulary is not None:
            return len(self.vocabulary.tgt)
        return self.tgt.get_piece_size()

    def fingerprint(self) -> str:
        """16 hex digits of a hash of what gives the ids their meaning: every piece of the
        source and target vocabularies in id order and the special ids. Equal for the same
        SentencePiece models however often they are loaded; different when any piece differs,
        even at the same vocabulary size (where the weights would load but mean nothing)."""
        if self._fingerprint is None:  # 32k pieces take about 10 ms: once per tokenizer
            src = self.src_pieces(list(range(self.src_vocab_size)))
            tgt = src if self.tgt is self.src and self.vocabulary is None else self.tgt_pieces(
                list(range(self.tgt_vocab_size)))
            meaning = {"src": src, "tgt": tgt,
                       "special": [self.pad_id, self.unk_id, self.bos_id, self.eos_id]}
            # JSON keeps pieces apart whatever characters they hold.
            digest = hashlib.sha256(json.dumps(meaning, ensure_ascii=False).encode("utf-8"))
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        if self.vocabulary is not None:
            return self.vocabulary.src_ids(self.src.encode(texts, out_type=str))
        return self.src.encode(texts)

    def encode_sources(self, texts: list[str], max_positions: int
                       ) -> tuple[list[list[int]], list[bool]]:
        """Source token ids of each text, cut to what a model of `max_positions` accepts (room
        left for the EOS it appends); and which texts were cut."""
        ids, limit = self.encode_src(texts), max_positions - 1
        return [s[:limit] for s in ids], [len(s) > limit for s in ids]

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        if self.vocabulary is not None:
            return self.vocabulary.tgt_ids(self.tgt.encode(texts, out_type=str))
        return self.tgt.encode(texts)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        if self.vocabulary is None:
            return self.tgt.decode(ids)
        control = {self.pad_id, self.bos_id, self.eos_id}
        # SentencePiece joins the pieces; the word marks of pieces it does not know itself
        # (a vocabulary may hold more) are left in, so they become spaces here.
        return [self.tgt.decode_pieces(self.tgt_pieces([i for i in row if i not in control]))
                .replace("\u2581", " ").strip() for row in ids]

    def processor(self, side: str) -> spm.SentencePieceProcessor:
        """The SentencePiece model of a side, "src" or "tgt"."""
        return self.src if side == "src" else self.tgt

    def ids_of(self, side: str, rows: list[list[int]]) -> list[list[int]]:
        """SentencePiece ids of a side as this tokenizer's ids: the same, unless a Vocabulary
        gives the pieces other ids."""
        if self.vocabulary is None:
            return rows
        processor = self.processor(side)
        pieces = [[processor.id_to_piece(i) for i in row] for row in rows]
        return (self.vocabulary.src_ids if side == "src" else self.vocabulary.tgt_ids)(pieces)

    def src_pieces(self, ids: list[int]) -> list[str]:
        if self.vocabulary is not None:
            return [self.vocabulary.src[i] for i in ids]
        return [self.src.id_to_piece(i) for i in ids]

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        if self.vocabulary is not None:
            return [self.vocabulary.tgt[i] for i in ids]
        return [self.tgt.id_to_piece(i) for i in ids]


class SubwordSampler:
    """Sampled segmentations of training pairs: subword regularisation (Kudo 2018, section 3),
    what `tokenizer.sample_alpha` turns on. Called by batch.training_steps for every pass of a
    training step (in the background thread that builds batches, where there is one).

    Each sentence takes one of its `sample_nbest` most probable segmentations under the
    unigram model, with probability P(segmentation)^alpha over the list (Kudo's l-best
    sampling), chosen by a uniform draw of its own: the draw of the sentence at position j of
    batch i of epoch e is the j-th of a stream seeded by (train.seed, e, i). The same seed
    thus gives the same segmentations in any process or thread, at any world size or number
    of passes, and a resumed run draws what the run it continues would have drawn.
    SentencePiece's own sampling is not used: its seed does not repeat its draws from one
    process to the next.

    A segmentation longer than the model takes (`max_len`, EOS included) is never drawn; the
    best one always fits (the batch plan counts its length). Sampled segmentations are usually
    a little longer than the best, so a batch may exceed train.batch_tokens a little: the plan
    keeps the best segmentation's lengths, which the encoded corpus holds."""

    STREAM = 7  # sets the draws apart from the batch order's stream, seeded by (seed, epoch)

    def __init__(self, tokenizer: Tokenizer, corpus: EncodedCorpus, cfg: TokenizerConfig,
                 seed: int, max_len: int) -> None:
        self.tokenizer, self.corpus, self.seed, self.max_len = tokenizer, corpus, seed, max_len
        self.alpha, self.nbest, self.target = cfg.sample_alpha, cfg.sample_nbest, cfg.sample_target
        for side in ("src", "tgt") if self.target else ("src",):
            try:  # the config checks model_type; a tokenizer of train.init_from may differ
                tokenizer.processor(side).nbest_encode("a", nbest_size=2)
            except RuntimeError:
                raise ConfigError("'tokenizer.sample_alpha' needs a unigram SentencePiece "
                                  "model: this run's tokenizer has no n-best segmentations "
                                  "('tokenizer.sample_nbest') to sample from") from None
        self._log_probs = {side: _log_probs(tokenizer.processor(side)) for side in ("src", "tgt")}

    def __call__(self, epoch: int, index: int, global_batch: np.ndarray, where: np.ndarray
                 ) -> tuple[list[list[int]], list[list[int]]]:
        """Source and target ids of the sentences at positions `where` of the global batch
        `index` of `epoch`: sampled (the target only with sample_target), or as encoded."""
        draws = np.random.default_rng([self.seed, epoch, index, self.STREAM]).random(
            (2, len(global_batch)))[:, where]
        rows = global_batch[where]
        src = self.sample(self.corpus.texts(rows, "src"), "src", draws[0])
        tgt = (self.sample(self.corpus.texts(rows, "tgt"), "tgt", draws[1]) if self.target
               else self.corpus.target_ids(rows))
        return src, tgt

    def sample(self, texts: list[str], side: str, draws: np.ndarray) -> list[list[int]]:
        """One segmentation of each text ("src" or "tgt" side), chosen by its draw in [0, 1).

        The whole batch's n-best lists are weighed at once, as flat arrays: a loop over each
        sentence's candidates in Python cost as much as the n-best search itself and, in the
        thread that builds batches, held the interpreter lock the training step needs."""
        if not texts:
            return []
        processor, log_probs = self.tokenizer.processor(side), self._log_probs[side]
        fits = [[ids for ids in nbest if len(ids) < self.max_len] or nbest[:1] or [[]]
                for nbest in processor.nbest_encode(texts, nbest_size=self.nbest)]
        candidates = [ids for nbest in fits for ids in nbest]
        counts = np.fromiter(map(len, fits), dtype=np.int64, count=len(fits))
        first = np.cumsum(counts) - counts  # each sentence's first candidate
        # log P(segmentation): the sum of its pieces' log-probabilities
        lengths = np.fromiter(map(len, candidates), dtype=np.int64, count=len(candidates))
        pieces = np.fromiter(itertools.chain.from_iterable(candidates), dtype=np.int64,
                             count=int(lengths.sum()))
        running = np.concatenate([[0.0], np.cumsum(log_probs[pieces])])
        ends = np.cumsum(lengths)
        scores = running[ends] - running[ends - lengths]
        # weights P^alpha, relative to each sentence's best; the draw u picks the first
        # candidate whose cumulative weight exceeds u times the sentence's total
        sentence = np.repeat(np.arange(len(fits)), counts)
        weights = np.exp(self.alpha * (scores - np.maximum.reduceat(scores, first)[sentence]))
        cumulative = np.cumsum(weights)
        before = (cumulative[first] - weights[first])[sentence]
        within, total = cumulative - before, (cumulative[first + counts - 1] - before[first])
        below = within <= (draws * total)[sentence]
        pick = np.minimum(np.add.reduceat(below.astype(np.int64), first), counts - 1)
        return self.tokenizer.ids_of(side, [candidates[i] for i in first + pick])


def _log_probs(processor: spm.SentencePieceProcessor) -> np.ndarray:
    """Each piece's log-probability as the unigram model scores a segmentation: <unk> at the
    lowest piece's score less 10, the penalty SentencePiece's lattice gives it."""
    scores = np.array([processor.get_score(i) for i in range(processor.get_piece_size())])
    normal = [i for i in range(len(scores)) if not (processor.is_control(i)
                                                    or processor.is_unknown(i))]
    scores[processor.unk_id()] = scores[normal].min() - 10.0
    return scores


VOCABULARY_FILE = "vocab.json"


@dataclass
class Vocabulary:
    """Pieces by id, for a model whose ids are not SentencePiece's (Marian's: one vocabulary
    over two SentencePiece models, the special pieces where that toolkit put them). `bos_id`
    is the token the decoder starts from (Marian starts from padding)."""

    src: list[str]
    tgt: list[str]
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int

    def __post_init__(self) -> None:
        self._src_index = {piece: i for i, piece in enumerate(self.src)}
        self._tgt_index = (self._src_index if self.tgt is self.src
                           else {piece: i for i, piece in enumerate(self.tgt)})

    def src_ids(self, pieces: list[list[str]]) -> list[list[int]]:
        index, unk = self._src_index, self.unk_id
        return [[index.get(p, unk) for p in row] for row in pieces]

    def tgt_ids(self, pieces: list[list[str]]) -> list[list[int]]:
        index, unk = self._tgt_index, self.unk_id
        return [[index.get(p, unk) for p in row] for row in pieces]

    @classmethod
    def load(cls, path: Path) -> Vocabulary | None:
        """The vocabulary in `path`, or None where there is none (SentencePiece's ids)."""
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            src = data["source"]
            tgt = data.get("target") or src
            vocabulary = cls(src, tgt, *(int(data[k]) for k in ("pad_id", "unk_id", "bos_id",
                                                                  "eos_id")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TraduireError(f"{path}: unreadable vocabulary ({e})") from None
        size = min(len(vocabulary.src), len(vocabulary.tgt))
        if not all(0 <= i < size for i in (vocabulary.pad_id, vocabulary.unk_id,
                                           vocabulary.bos_id, vocabulary.eos_id)):
            raise TraduireError(f"{path}: a special id lies outside the vocabulary")
        return vocabulary

    def save(self, path: Path) -> None:
        data = {"source": self.src, "target": None if self.tgt is self.src else self.tgt,
                "pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id}
        atomic_write_bytes(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def _processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SentencePiece model not found")
    return spm.SentencePieceProcessor(model_file=str(path))


# SentencePiece's training sample is drawn with this seed: the tokenizer stage's output depends on
# its settings and the data alone.
SAMPLE_SEED = 0
SAMPLE_CHUNK = 100_000  # rows read from Arrow at a time while sampling
# SentencePiece adds up its counts thread by thread, so the model it makes depends on its number
# of threads (with 1, 2 and 4 threads on Multi30k: other pieces, other ids). A fixed number makes
# the tokenizer the same on every machine; 16 keep the cores of most machines busy.
SPM_THREADS = 16


def train_tokenizer(train: datasets.Dataset, cfg: TokenizerConfig, out_dir: Path) -> Tokenizer:
    """Train SentencePiece and write spm.model (or spm.src/tgt.model).

    It trains on a uniform random sample of `cfg.input_sentence_size` training sentences (of
    both sides when joint), read from the Arrow table chunk by chunk, in SPM_THREADS threads:
    the same model on any machine."""
    if cfg.joint:
        atomic_write_bytes(out_dir / "spm.model", _train_apart(train, ["src", "tgt"], cfg))
    else:
        for side in ("src", "tgt"):
            atomic_write_bytes(out_dir / f"spm.{side}.model", _train_apart(train, [side], cfg))
    return Tokenizer.load(out_dir)


def _train_apart(train: datasets.Dataset, columns: list[str], cfg: TokenizerConfig) -> bytes:
    """Sample and train in a child process. SentencePiece holds its sample and counts in
    memory (3.4 GB for 2M sentences of the synthetic benchmark corpus); a process that ends
    hands all of it back to the system, whereas memory freed inside this one stays in its heap
    and is then copied into every encoding worker it forks."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
            return pool.submit(_sample_and_train, train, columns, cfg).result()
    except BrokenProcessPool:
        raise TraduireError("SentencePiece training ended abruptly (out of memory?); lower "
                            "'tokenizer.input_sentence_size'") from None


def _sample_and_train(train: datasets.Dataset, columns: list[str], cfg: TokenizerConfig
                      ) -> bytes:
    return _train_model(sample_sentences(train, columns, cfg.input_sentence_size), cfg)


def sample_sentences(pairs: datasets.Dataset, columns: list[str], size: int,
                     seed: int = SAMPLE_SEED) -> Iterator[str]:
    """A uniform random sample, without replacement, of `size` of the sentences in `columns`
    (every sentence if there are fewer), in corpus order, the same for the same seed.

    Streamed: each chunk of rows gets its share of the sample from the hypergeometric
    distribution (how many of the sentences still wanted fall in it), then that many of its
    rows at random, so memory holds one chunk at a time."""
    rng = np.random.default_rng(seed)
    remaining = len(pairs) * len(columns)
    wanted = min(size, remaining) if size > 0 else remaining
    for column in columns:
        chunks = pairs.select_columns([column]).with_format("arrow").iter(SAMPLE_CHUNK)
        for chunk in chunks:
            n = chunk.num_rows
            take = int(rng.hypergeometric(n, remaining - n, wanted)) if wanted < remaining else n
            rows = np.sort(rng.choice(n, size=take, replace=False)) if take < n else None
            texts = chunk.column(0) if rows is None else chunk.column(0).take(rows)
            yield from texts.to_pylist()
            remaining, wanted = remaining - n, wanted - take


def _train_model(sentences: Iterator[str], cfg: TokenizerConfig) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            pad_id=cfg.pad_id, unk_id=cfg.unk_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id,
            # The sentences are already the sample: SentencePiece keeps them all.
            input_sentence_size=cfg.input_sentence_size, shuffle_input_sentence=False,
            num_threads=SPM_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(_training_error(" ".join(str(e).split()))) from None
    return model.getvalue()


def _training_error(message: str) -> str:
    """SentencePiece's complaint as a one-line message naming the key to change."""
    if match := re.search(r"Vocabulary size too high.*", message):
        return f"'tokenizer.vocab_size' is too large for this corpus: {match[0]}"
    if match := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)",
                          message):
        return (f"'tokenizer.vocab_size' ({match[1]}) is too small for this corpus: its "
                f"characters and the special pieces need {match[2]}; raise it, or lower "
                "'tokenizer.character_coverage' to map rare characters to <unk>")
    return f"SentencePiece training failed: {message}"


_IDS = datasets.List(datasets.Value("int32"))
ENCODED_FEATURES = datasets.Features({
    "src": datasets.Value("string"), "tgt": datasets.Value("string"),
    "src_ids": _IDS, "tgt_ids": _IDS,
    "src_len": datasets.Value("int32"), "tgt_len": datasets.Value("int32")})


def encode_corpus(pairs: datasets.Dataset, tokenizer: Tokenizer, cache_file: Path,
                  workers: int = 1, desc: str = "encoding") -> datasets.Dataset:
    """Add columns src_ids, tgt_ids, src_len, tgt_len (lengths without specials), encoded in
    up to `workers` processes (the same ids for any number) and cached on disk in the run
    directory."""
    if len(pairs) == 0:  # map() would hand back the input, without the new columns
        return datasets.Dataset.from_dict({name: [] for name in ENCODED_FEATURES},
                                          features=ENCODED_FEATURES)
    return pairs.map(_encode, batched=True, batch_size=10_000, features=ENCODED_FEATURES,
                     cache_file_name=str(cache_file), num_proc=processes(len(pairs), workers),
                     desc=desc, fn_kwargs={"tokenizer": tokenizer})


def _encode(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, Any]:
    src_ids, tgt_ids = tokenizer.encode_src(batch["src"]), tokenizer.encode_tgt(batch["tgt"])
    return {"src_ids": src_ids, "tgt_ids": tgt_ids,
            "src_len": np.fromiter(map(len, src_ids), dtype=np.int32, count=len(src_ids)),
            "tgt_len": np.fromiter(map(len, tgt_ids), dtype=np.int32, count=len(tgt_ids))}
