"""Tests for traduire.tokenizer: SentencePiece trained on a streamed sample, corpus encoding."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import datasets
import numpy as np
import pytest
import sentencepiece as spm

from conftest import make_pair
from traduire import runtime
from traduire.batch import EncodedCorpus
from traduire.config import TokenizerConfig
from traduire.errors import ConfigError, TraduireError
from traduire.tokenizer import (
    SubwordSampler,
    Tokenizer,
    encode_corpus,
    sample_sentences,
    train_tokenizer,
)


def numbered_pairs(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"src": [f"s{i}" for i in range(n)],
                                       "tgt": [f"t{i}" for i in range(n)]})


# --- the training sample -----------------------------------------------------------------------


def test_sample_is_a_seeded_subset_in_corpus_order(monkeypatch):
    monkeypatch.setattr("traduire.tokenizer.SAMPLE_CHUNK", 7)  # many chunks, a short last one
    pairs = numbered_pairs(100)
    sample = list(sample_sentences(pairs, ["src", "tgt"], 30))
    assert len(sample) == len(set(sample)) == 30
    order = [f"s{i}" for i in range(100)] + [f"t{i}" for i in range(100)]
    assert sample == [s for s in order if s in set(sample)]  # a subset, in corpus order
    assert list(sample_sentences(pairs, ["src", "tgt"], 30)) == sample
    assert list(sample_sentences(pairs, ["src", "tgt"], 30, seed=1)) != sample


def test_sample_of_more_than_there_is_is_everything():
    pairs = numbered_pairs(10)
    everything = [f"s{i}" for i in range(10)] + [f"t{i}" for i in range(10)]
    assert list(sample_sentences(pairs, ["src", "tgt"], 1000)) == everything
    assert list(sample_sentences(pairs, ["src", "tgt"], 0)) == everything  # 0: all
    assert list(sample_sentences(pairs, ["tgt"], 20)) == everything[10:]


def test_sample_is_uniform(monkeypatch):
    # Over 300 samples of 20 of 60 sentences, each is drawn 100 times on average, and under
    # uniform sampling within 100 +- 5 standard deviations (about 8) every time.
    monkeypatch.setattr("traduire.tokenizer.SAMPLE_CHUNK", 8)
    pairs = numbered_pairs(30)
    counts: dict[str, int] = {}
    for seed in range(300):
        for s in sample_sentences(pairs, ["src", "tgt"], 20, seed=seed):
            counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 60
    assert 60 < min(counts.values()) and max(counts.values()) < 140


def test_sentencepiece_sees_at_most_input_sentence_size_sentences(monkeypatch, tmp_path):
    log = tmp_path / "seen.txt"  # SentencePiece trains in a child process: it writes here
    original = spm.SentencePieceTrainer.train

    def counting(**kwargs):
        sentences = list(kwargs.pop("sentence_iterator"))
        with open(log, "a") as f:
            f.write(f"{len(sentences)}\n")
        return original(sentence_iterator=iter(sentences), **kwargs)

    def seen() -> list[int]:
        return [int(n) for n in log.read_text().split()]

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", counting)
    words = "the a dog cat bird horse runs sleeps eats big small red".split()
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(words, 6)) for _ in range(400)]
    pairs = datasets.Dataset.from_dict({"src": text[:200], "tgt": text[200:]})
    train_tokenizer(pairs, TokenizerConfig(vocab_size=30, input_sentence_size=150), tmp_path)
    assert seen() == [150]
    train_tokenizer(pairs, TokenizerConfig(vocab_size=30, joint=False, input_sentence_size=120),
                    tmp_path)
    assert seen() == [150, 120, 120]  # one model per side


def test_vocabulary_too_small_for_the_characters_says_so(tmp_path):
    text = ["".join(chr(0x4E00 + 7 * i + j) for j in range(7)) for i in range(20)]
    pairs = datasets.Dataset.from_dict({"src": text, "tgt": text})
    with pytest.raises(ConfigError, match=r"'tokenizer.vocab_size' \(20\) is too small.*"
                                          r"character_coverage"):
        train_tokenizer(pairs, TokenizerConfig(vocab_size=20), tmp_path)


# --- encoding ----------------------------------------------------------------------------------


def test_encoding_gives_the_same_ids_in_one_or_two_processes(tmp_path, monkeypatch):
    words = "the a dog cat bird horse runs sleeps eats big small red".split()
    rng = np.random.default_rng(1)
    text = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(300)]
    pairs = datasets.Dataset.from_dict({"src": text[:150], "tgt": text[150:]})
    tokenizer = train_tokenizer(pairs, TokenizerConfig(vocab_size=30), tmp_path / "tok")
    monkeypatch.setattr(runtime, "ROWS_PER_PROCESS", 20)
    one = encode_corpus(pairs, tokenizer, tmp_path / "one.arrow", workers=1)
    two = encode_corpus(pairs, tokenizer, tmp_path / "two.arrow", workers=2)
    assert len(list(tmp_path.glob("two_*.arrow"))) == 2  # really two processes
    assert one.to_dict() == two.to_dict()
    assert one["src_ids"] == tokenizer.encode_src(text[:150])
    assert one["tgt_len"] == [len(ids) for ids in tokenizer.encode_tgt(text[150:])]


def test_the_tokenizer_does_not_depend_on_the_cores_of_the_machine(tmp_path, monkeypatch):
    # SentencePiece's model changes with its number of threads (on this corpus too: 1, 2 and 64
    # threads make three different models); they must not follow the cores.
    rng = random.Random(0)
    toy = [make_pair(rng) for _ in range(300)]
    pairs = datasets.Dataset.from_dict({"src": [s for s, _ in toy], "tgt": [t for _, t in toy]})
    models = []
    for cores in ({0}, set(range(64))):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores,
                            raising=False)
        train_tokenizer(pairs, TokenizerConfig(vocab_size=40), tmp_path / str(len(cores)))
        models.append((tmp_path / str(len(cores)) / "spm.model").read_bytes())
    assert models[0] == models[1]


def test_sentencepiece_trains_in_a_process_that_ends(monkeypatch, tmp_path):
    """Its memory goes back to the system with the process; a crash there is one line."""
    pids = []
    original = spm.SentencePieceTrainer.train

    def recording(**kwargs):
        pids.append(os.getpid())  # recorded in the child's copy of the list only
        return original(**kwargs)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", recording)
    pairs = datasets.Dataset.from_dict({"src": ["a dog runs"] * 50, "tgt": ["un chien court"] * 50})
    train_tokenizer(pairs, TokenizerConfig(vocab_size=20), tmp_path)
    assert pids == [] and (tmp_path / "spm.model").is_file()

    def dying(**kwargs):
        os._exit(9)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", dying)
    with pytest.raises(TraduireError, match="SentencePiece training ended abruptly.*"
                       "input_sentence_size"):
        train_tokenizer(pairs, TokenizerConfig(vocab_size=20), tmp_path / "again")


# --- the vocabulary's fingerprint --------------------------------------------------------------


def toy_pairs(upper: bool = False) -> datasets.Dataset:
    rng = random.Random(0)
    toy = [make_pair(rng) for _ in range(200)]
    if upper:  # the same sentences in capitals: other pieces, as many of them
        toy = [(s.upper(), t.upper()) for s, t in toy]
    return datasets.Dataset.from_dict({"src": [s for s, _ in toy], "tgt": [t for _, t in toy]})


def test_the_fingerprint_is_the_same_for_the_same_models_however_often_loaded(tmp_path):
    trained = train_tokenizer(toy_pairs(), TokenizerConfig(vocab_size=40), tmp_path)
    first, second = Tokenizer.load(tmp_path), Tokenizer.load(tmp_path)
    assert first is not second and first.src is first.tgt  # joint
    assert trained.fingerprint() == first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 16 and int(first.fingerprint(), 16) >= 0
    # Computed once: a second call does not read the pieces again.
    first.src = first.tgt = None
    assert first.fingerprint() == second.fingerprint()


def test_the_fingerprint_differs_for_other_pieces_of_the_same_number(tmp_path):
    lower = train_tokenizer(toy_pairs(), TokenizerConfig(vocab_size=40), tmp_path / "lower")
    upper = train_tokenizer(toy_pairs(upper=True), TokenizerConfig(vocab_size=40),
                            tmp_path / "upper")
    assert lower.src_vocab_size == upper.src_vocab_size == 40
    assert lower.fingerprint() != upper.fingerprint()
    # Either side's model swapped for another of the same size changes it too.
    mixed = Tokenizer(lower.src, upper.tgt)
    assert len({lower.fingerprint(), upper.fingerprint(), mixed.fingerprint()}) == 3
    assert Tokenizer(lower.src, lower.tgt).fingerprint() == lower.fingerprint()


# --- subword sampling --------------------------------------------------------------------------


def sampler_for(tmp_path, alpha: float = 0.5, target: bool = False, max_len: int = 64,
                seed: int = 1) -> SubwordSampler:
    pairs = toy_pairs()
    tokenizer = train_tokenizer(pairs, TokenizerConfig(vocab_size=40), tmp_path)
    corpus = EncodedCorpus(encode_corpus(pairs, tokenizer, tmp_path / "encoded.arrow"))
    cfg = TokenizerConfig(vocab_size=40, sample_alpha=alpha, sample_nbest=8,
                          sample_target=target)
    return SubwordSampler(tokenizer, corpus, cfg, seed, max_len)


def test_sampled_segmentations_follow_the_seed_change_each_epoch_and_decode_to_the_text(
        tmp_path):
    sampler = sampler_for(tmp_path, target=True)
    corpus, tokenizer = sampler.corpus, sampler.tokenizer
    batch, where = np.arange(0, 120, 2), np.arange(60)
    src, tgt = sampler(0, 5, batch, where)
    assert (src, tgt) == sampler(0, 5, batch, where)  # the same seed: the same draws
    best_src, best_tgt = corpus.source_ids(batch), corpus.target_ids(batch)
    assert src != best_src and tgt != best_tgt  # some sentences take another segmentation
    assert tokenizer.decode_tgt(src) == tokenizer.decode_tgt(best_src)
    assert tokenizer.decode_tgt(tgt) == corpus.texts(batch, "tgt")
    assert sampler(1, 5, batch, where)[0] != src  # another epoch, other draws
    assert sampler(0, 6, batch, where)[0] != src  # another batch too
    other_seed = SubwordSampler(tokenizer, corpus, TokenizerConfig(
        vocab_size=40, sample_alpha=0.5, sample_nbest=8), 2, 64)
    assert other_seed(0, 5, batch, where)[0] != src
    # Without sample_target the target is the best segmentation, as encoded.
    assert SubwordSampler(tokenizer, corpus, TokenizerConfig(
        vocab_size=40, sample_alpha=0.5, sample_nbest=8), 1, 64)(0, 5, batch, where)[1] == \
        best_tgt


def test_a_sentence_draws_the_same_however_its_batch_is_split(tmp_path):
    sampler = sampler_for(tmp_path)
    batch = np.arange(40)
    whole = sampler(3, 0, batch, np.arange(40))[0]
    halves = sampler(3, 0, batch, np.arange(17))[0] + sampler(3, 0, batch, np.arange(17, 40))[0]
    assert halves == whole


def test_sampling_draws_the_same_in_another_process(tmp_path):
    """SentencePiece's own sampling, seeded alike, draws differently in each process; the
    sampler's draws do not depend on the process."""
    sampler = sampler_for(tmp_path)
    batch = np.arange(50)
    here = sampler(2, 4, batch, np.arange(50))[0]
    script = ("import json, sys, numpy as np, datasets\n"
              "from traduire.batch import EncodedCorpus\n"
              "from traduire.config import TokenizerConfig\n"
              "from traduire.tokenizer import SubwordSampler, Tokenizer\n"
              "t = Tokenizer.load(__import__('pathlib').Path(sys.argv[1]))\n"
              "c = EncodedCorpus(datasets.Dataset.from_file(sys.argv[2]))\n"
              "s = SubwordSampler(t, c, TokenizerConfig(vocab_size=40, sample_alpha=0.5, "
              "sample_nbest=8), 1, 64)\n"
              "print(json.dumps(s(2, 4, np.arange(50), np.arange(50))[0]))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path),
                          str(tmp_path / "encoded.arrow")], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == here


def test_the_scores_sampled_from_are_sentencepieces(tmp_path):
    """The log-probabilities the draws weigh are SentencePiece's scores of the n-best list,
    an unknown character's penalty included."""
    sampler = sampler_for(tmp_path)
    processor = sampler.tokenizer.src
    for text in ["a big dog runs here", "the cat ω sleeps"]:
        for candidate in processor.nbest_encode(text, nbest_size=4, out_type="proto").nbests:
            ids = [piece.id for piece in candidate.pieces]
            assert sampler._log_probs["src"][ids].sum() == pytest.approx(candidate.score,
                                                                          abs=1e-4)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_each_sentence_draws_by_its_own_weights(tmp_path, alpha):
    """The batch-at-once draw against the rule written sentence by sentence: candidate k of a
    sentence is taken when its cumulative weight P^alpha is the first to exceed u times the
    total (Kudo 2018's l-best sampling)."""
    sampler = sampler_for(tmp_path, alpha=alpha, max_len=12)
    processor, log_probs = sampler.tokenizer.src, sampler._log_probs["src"]
    batch = np.arange(150)
    for epoch, index in [(0, 0), (1, 3), (4, 2)]:
        sampled = sampler(epoch, index, batch, np.arange(150))[0]
        texts = sampler.corpus.texts(batch, "src")
        draws = np.random.default_rng([1, epoch, index, SubwordSampler.STREAM]).random((2, 150))
        expected = []
        for text, u in zip(texts, draws[0]):
            nbest = [ids for ids in processor.nbest_encode(text, nbest_size=8) if len(ids) < 12]
            nbest = nbest or processor.nbest_encode(text, nbest_size=1)
            weights = np.exp(alpha * np.array([log_probs[ids].sum() for ids in nbest]))
            k = int(np.searchsorted(np.cumsum(weights), u * weights.sum(), side="right"))
            expected.append(nbest[min(k, len(nbest) - 1)])
        assert sampled == sampler.tokenizer.ids_of("src", expected)
    assert sampler.sample([], "src", np.zeros(0)) == []


def test_a_sampled_segmentation_never_outgrows_the_model(tmp_path):
    sampler = sampler_for(tmp_path, alpha=0.0001, max_len=8)  # all but uniform over the list
    batch = np.arange(200)
    best = sampler.corpus.source_ids(batch)
    for epoch in range(3):
        sampled = sampler(epoch, 0, batch, np.arange(200))[0]
        # What fits (EOS included) fits still; a longer best segmentation is kept as it is.
        assert all(len(s) < 8 or s == b for s, b in zip(sampled, best))


def test_sampling_with_a_model_without_nbest_is_refused(tmp_path):
    pairs = toy_pairs()
    bpe = train_tokenizer(pairs, TokenizerConfig(model_type="bpe", vocab_size=60), tmp_path)
    corpus = EncodedCorpus(encode_corpus(pairs, bpe, tmp_path / "encoded.arrow"))
    with pytest.raises(ConfigError, match="'tokenizer.sample_alpha' needs a unigram"):
        SubwordSampler(bpe, corpus, TokenizerConfig(sample_alpha=0.1), 1, 64)
