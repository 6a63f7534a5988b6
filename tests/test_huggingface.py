"""Hugging Face transformers in and out: imported models give transformers' logits and
searches, exported ones give traduire's; nothing touches the network.

The transformers side of each check is a model built here from a config with random weights,
or a model traduire trained on the toy corpus and exported; the SentencePiece models are
trained here on tiny text."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from conftest import one_line_error, tiny_settings, write_corpus

transformers = pytest.importorskip("transformers")

from traduire.batch import source_batch  # noqa: E402
from traduire.config import config_from_dict  # noqa: E402
from traduire.huggingface import import_model, write_transformers  # noqa: E402
from traduire.loading import load_for_decoding  # noqa: E402
from traduire.search import SearchOptions, decode  # noqa: E402
from traduire.tokenizer import Tokenizer  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ENGLISH = ["the cat sits on the mat", "a dog runs in the park", "the man reads a big book",
           "two women walk home", "a small bird sings", "the children play outside"]
FRENCH = ["le chat est assis sur le tapis", "un chien court dans le parc",
          "l'homme lit un gros livre", "deux femmes rentrent", "un petit oiseau chante",
          "les enfants jouent dehors"]
TEXTS = ["the cat runs in the park", "a man", "two small dogs play", "the woman reads a book",
         "zebra", "the bird walks on the mat outside"]
TARGETS = ["le chien court", "un homme lit un livre", "deux oiseaux", "les femmes"]


def _spm(lines: list[str], size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 20), model_writer=model,
                                   vocab_size=size, minloglevel=2)
    return model.getvalue()


def _vocab(path: Path, *spm_files: Path, pad_last: bool = True) -> dict[str, int]:
    """A Marian-style vocabulary: </s> 0, <unk> 1, the pieces of the SentencePiece models,
    <pad> last (or 2, where two vocabularies must agree on it)."""
    vocab = {"</s>": 0, "<unk>": 1} if pad_last else {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for file in spm_files:
        processor = spm.SentencePieceProcessor(model_file=str(file))
        for i in range(processor.get_piece_size()):
            if not (processor.is_control(i) or processor.is_unknown(i)):
                vocab.setdefault(processor.id_to_piece(i), len(vocab))
    vocab.setdefault("<pad>", len(vocab))
    path.write_text(json.dumps(vocab), encoding="utf-8")
    return vocab


def make_transformers_model(out: Path, kind: str = "marian", separate: bool = False,
                            **config) -> Path:
    """A random-weight Marian (or Pegasus) model with a MarianTokenizer, saved in `out`."""
    out.mkdir(parents=True)
    (out / "source.spm").write_bytes(_spm(ENGLISH, 30))
    (out / "target.spm").write_bytes(_spm(FRENCH, 33))
    if separate:
        vocab = _vocab(out / "vocab.json", out / "source.spm", pad_last=False)
        target = _vocab(out / "target_vocab.json", out / "target.spm", pad_last=False)
    else:
        vocab = target = _vocab(out / "vocab.json", out / "source.spm", out / "target.spm")
    pad = vocab["<pad>"]
    settings = {**dict(vocab_size=len(vocab), d_model=16, encoder_layers=2, decoder_layers=1,
                       encoder_attention_heads=2, decoder_attention_heads=2,
                       encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64,
                       pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad), **config}
    if kind == "marian":
        if separate:
            assert target["<pad>"] == pad  # one padding id for both sides, as in traduire
            settings.update(share_encoder_decoder_embeddings=False,
                            decoder_vocab_size=len(target))
        model = transformers.MarianMTModel(transformers.MarianConfig(**settings))
    else:
        model = transformers.PegasusForConditionalGeneration(
            transformers.PegasusConfig(**settings))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:  # fixed sinusoids, saved by Pegasus
                parameter.normal_(0.0, 0.3)
        model.final_logits_bias.normal_()
    model.save_pretrained(out)
    extra = {"separate_vocabs": True, "target_vocab_file": str(out / "target_vocab.json")} \
        if separate else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sacremoses is recommended, not needed
        transformers.MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"),
                                     str(out / "vocab.json"), **extra).save_pretrained(out)
    return out


def load_transformers(directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory,
                                                                   local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


def load_run(run_dir: Path, checkpoint: str = "best.pt"):
    tok = Tokenizer.load(run_dir / "tokenizer")
    model, _ = load_for_decoding(run_dir / checkpoint, tok, run_dir / "tokenizer",
                                 torch.device("cpu"), "fp32")
    return model, tok


def teacher_forced(tok: Tokenizer):
    """A padded batch of sources and of decoder inputs (start token + target), and which
    decoder positions are real."""
    src = source_batch(tok.encode_src(TEXTS[:len(TARGETS)]), pad=tok.pad_id, eos=tok.eos_id)
    targets = [[tok.bos_id] + ids for ids in tok.encode_tgt(TARGETS)]
    width = max(map(len, targets))
    tgt_in = torch.tensor([t + [tok.pad_id] * (width - len(t)) for t in targets])
    real = torch.tensor([[i < len(t) for i in range(width)] for t in targets])
    return src, tgt_in, real


def assert_same_logits(ours_model, hf_model, tok: Tokenizer) -> None:
    src, tgt_in, real = teacher_forced(tok)
    assert (src == tok.pad_id).any() and (~real).any()  # padded on both sides
    with torch.no_grad():
        ours = ours_model(src, tgt_in)
        theirs = hf_model(input_ids=src, attention_mask=src != tok.pad_id,
                          decoder_input_ids=tgt_in).logits
    assert ours.shape == theirs.shape
    assert ours[real].abs().max() > 0.1  # not a model of zeros
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def assert_same_ids(tok: Tokenizer, hf_tokenizer) -> None:
    """The transformers tokenizer gives traduire's ids (and the EOS traduire appends)."""
    source = hf_tokenizer(TEXTS).input_ids
    assert source == [ids + [tok.eos_id] for ids in tok.encode_src(TEXTS)]
    target = hf_tokenizer(text_target=TARGETS).input_ids
    assert target == [ids + [tok.eos_id] for ids in tok.encode_tgt(TARGETS)]
    assert any(tok.unk_id in ids for ids in tok.encode_src(TEXTS))  # "zebra": unknown pieces


# --- Import ------------------------------------------------------------------------------

IMPORTED = {
    "marian-shared-swish": dict(kind="marian", activation_function="swish",
                                scale_embedding=True),
    # odd sizes, separate vocabularies and embeddings, unscaled embeddings
    "marian-separate-odd": dict(kind="marian", separate=True, activation_function="relu",
                                scale_embedding=False, d_model=12, encoder_attention_heads=3,
                                decoder_attention_heads=3, encoder_ffn_dim=20,
                                decoder_ffn_dim=20, encoder_layers=3),
    "pegasus-gelu": dict(kind="pegasus", activation_function="gelu", scale_embedding=True),
}


@pytest.mark.parametrize("name", IMPORTED)
def test_import_gives_the_logits_and_ids_of_transformers(tmp_path, name):
    source = make_transformers_model(tmp_path / "hf", **IMPORTED[name])
    run_dir = import_model(source, tmp_path / "run")
    model, tok = load_run(run_dir)
    hf_model, hf_tokenizer = load_transformers(source)
    assert model.shape.norm == ("pre" if name.startswith("pegasus") else "post")
    assert model.output_bias is not None
    assert_same_logits(model, hf_model, tok)
    assert_same_ids(tok, hf_tokenizer)
    assert tok.bos_id == tok.pad_id  # Marian's decoder starts from padding


def test_import_refuses_what_traduire_cannot_express(tmp_path):
    source = make_transformers_model(tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    for field, value in (("activation_function", "gelu_new"), ("decoder_ffn_dim", 48),
                         ("tie_word_embeddings", False), ("model_type", "bart")):
        (source / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(Exception, match=f"'{field}'") as error:
            import_model(source, tmp_path / "run")
        assert "\n" not in str(error.value)
        assert not (tmp_path / "run").exists()


# --- Export, and back ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marian_like_run(tmp_path_factory) -> Path:
    """A run that learns the toy corpus with what Marian models have: post-norm, swish, an
    output bias, unscaled embeddings, two vocabularies and two embedding matrices."""
    from traduire.pipeline import run

    root = tmp_path_factory.mktemp("marian-like")
    settings = tiny_settings(write_corpus(root / "data"),
                             tokenizer={"vocab_size": 36, "joint": False},
                             model={"dropout": 0.0, "norm": "post", "activation": "swish",
                                    "output_bias": True, "scale_embedding": False,
                                    "share_embeddings": False, "d_model": 24, "heads": 3,
                                    "ffn_dim": 40, "encoder_layers": 2, "decoder_layers": 1},
                             train={"max_steps": 80, "save_every": 80, "valid_every": 80,
                                    "log_every": 80, "lr": 0.01, "warmup_steps": 5})
    run(config_from_dict(settings), root / "run")
    return root / "run"


def _valid_lines(run_dir: Path) -> list[str]:
    import datasets

    return datasets.load_from_disk(str(run_dir / "data" / "valid"))["src"]


def assert_same_searches(model, hf_model, tok: Tokenizer, sources: list[str]) -> None:
    """Greedy and beam-4 search give transformers' generate outputs where both define the same
    search: ranked by log-probability (their length penalties differ), a sentence searched
    until no live hypothesis can still beat a finished one (generate's early_stopping "never";
    with True it stops at the first `beam` finished ones and misses better later ones)."""
    ids = tok.encode_src(sources)
    src = source_batch(ids, pad=tok.pad_id, eos=tok.eos_id)
    never = [[tok.pad_id]] + ([[tok.bos_id]] if tok.bos_id != tok.pad_id else [])
    for beam in (1, 4):
        options = SearchOptions(beam=beam, lenpen=0.0, max_len_a=0.0, max_len_b=40)
        ours = [hyps[0].tokens for hyps in decode(model, tok, ids, options)]
        out = hf_model.generate(input_ids=src, attention_mask=src != tok.pad_id,
                                num_beams=beam, do_sample=False, length_penalty=0.0,
                                early_stopping="never", bad_words_ids=never, max_new_tokens=41,
                                decoder_start_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                pad_token_id=tok.pad_id)
        theirs = [[t for t in row[1:].tolist() if t not in (tok.eos_id, tok.pad_id)]
                  for row in out]
        assert all(0 < len(t) < 40 for t in ours)  # ended by EOS, not by the limit
        assert ours == theirs, f"beam {beam}"


@pytest.mark.parametrize("which", ["marian_like_run", "learned_run"])
def test_export_gives_traduire_logits_ids_and_searches(tmp_path, which, request):
    run_dir = request.getfixturevalue(which)
    model, tok = load_run(run_dir)
    out = write_transformers(model, tok, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    hf_model, hf_tokenizer = load_transformers(out)
    expected = "MarianMTModel" if model.shape.norm == "post" else \
        "PegasusForConditionalGeneration"
    assert type(hf_model).__name__ == expected
    assert_same_logits(model, hf_model, tok)
    assert_same_ids(tok, hf_tokenizer)
    assert_same_searches(model, hf_model, tok, _valid_lines(run_dir)[:12])


def test_export_import_round_trip_keeps_every_weight(tmp_path, marian_like_run):
    model, tok = load_run(marian_like_run)
    write_transformers(model, tok, tmp_path / "hf")
    back, back_tok = load_run(import_model(tmp_path / "hf", tmp_path / "run"))
    assert back.shape == model.shape
    assert back_tok.encode_src(TEXTS) == tok.encode_src(TEXTS)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # and once more the other way: transformers' weights survive import -> export
    write_transformers(back, back_tok, tmp_path / "hf2")
    first = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").state_dict()
    second = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf2").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_import_of_a_transformers_model_translates_as_it_does(tmp_path, learned_run):
    """A traduire model exported, imported back: its searches are transformers'."""
    model, tok = load_run(learned_run)
    write_transformers(model, tok, tmp_path / "hf")
    imported, imported_tok = load_run(import_model(tmp_path / "hf", tmp_path / "run"))
    hf_model, _ = load_transformers(tmp_path / "hf")
    assert_same_searches(imported, hf_model, imported_tok, _valid_lines(learned_run)[:12])


def test_export_refuses_what_no_class_expresses(tmp_path, learned_run):
    from traduire.errors import TraduireError
    from traduire.huggingface import transformers_config

    model, tok = load_run(learned_run)
    model.shape = type(model.shape)(**{**vars(model.shape), "share_embeddings": False})
    with pytest.raises(TraduireError, match="share_embeddings"):
        transformers_config(model, tok)


def test_export_never_replaces_a_foreign_directory(tmp_path, learned_run):
    from traduire.errors import TraduireError

    model, tok = load_run(learned_run)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TraduireError, match="not a transformers model"):
        write_transformers(model, tok, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    write_transformers(model, tok, tmp_path / "hf")
    with pytest.raises(TraduireError, match="--force"):
        write_transformers(model, tok, tmp_path / "hf")
    write_transformers(model, tok, tmp_path / "hf", force=True)


# --- The command line ------------------------------------------------------------------------


def test_cli_import_then_translate_eval_info_and_export(tmp_path, learned_run):
    from typer.testing import CliRunner

    from traduire.cli import app

    runner = CliRunner()
    model, tok = load_run(learned_run)
    write_transformers(model, tok, tmp_path / "hf")
    result = runner.invoke(app, ["import", str(tmp_path / "hf"), "--run-dir",
                                 str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    sources = _valid_lines(learned_run)[:5]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    result = runner.invoke(app, ["translate", "--run-dir", str(tmp_path / "run"), "--quiet",
                                 str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt")])
    assert result.exit_code == 0, result.output
    ours = (tmp_path / "out.txt").read_text().splitlines()
    result = runner.invoke(app, ["translate", "--run-dir", str(learned_run), "--quiet",
                                 str(tmp_path / "in.txt"), "-o", str(tmp_path / "orig.txt")])
    assert ours == (tmp_path / "orig.txt").read_text().splitlines()
    assert len(ours) == 5 and any(ours)
    result = runner.invoke(app, ["info", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"weights: imported from {(tmp_path / 'hf').resolve()} " \
        "(PegasusForConditionalGeneration)" in result.output
    result = runner.invoke(app, ["export", "--run-dir", str(tmp_path / "run"), "--format",
                                 "transformers", "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "config.json").is_file()


def test_cli_import_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from traduire.cli import app

    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    one_line_error(runner.invoke(app, ["import", str(tmp_path / "empty"), "--run-dir",
                                       str(tmp_path / "run")]), "config.json")
    source = make_transformers_model(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    one_line_error(runner.invoke(app, ["import", str(source), "--run-dir",
                                       str(tmp_path / "taken")]), "not empty")
    assert (tmp_path / "taken" / "file").read_text() == "x"
    shutil.rmtree(tmp_path / "taken")


def test_an_imported_model_fine_tunes_on_new_data(tmp_path, learned_run):
    """The run `import` makes has no data; train.init_from takes its weights, tokenizer (the
    vocabulary of ids) and architecture into a run on the user's corpus."""
    from conftest import small_settings, write_config
    from traduire.checkpoint import step_checkpoints
    from traduire.config import load_config
    from traduire.pipeline import run

    model, tok = load_run(learned_run)
    write_transformers(model, tok, tmp_path / "hf")
    imported = import_model(tmp_path / "hf", tmp_path / "imported")
    settings = small_settings(write_corpus(tmp_path / "data", seed=3))
    settings["model"] = {"dropout": 0.0}
    settings["train"].update(init_from=str(imported), max_steps=3, save_every=3)
    config = load_config(write_config(tmp_path / "ft.yaml", settings))
    assert config.model.d_model == model.shape.d_model
    run(config, tmp_path / "ft")
    tuned, tuned_tok = load_run(tmp_path / "ft", "best.pt")
    assert tuned_tok.fingerprint() == Tokenizer.load(imported / "tokenizer").fingerprint()
    assert tuned_tok.vocabulary is not None  # the imported ids, not SentencePiece's
    start = model.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in tuned.state_dict().items())
    assert len(step_checkpoints(tmp_path / "ft" / "checkpoints")) == 1
    with pytest.raises(Exception, match="no data of its own"):
        run(load_config(tmp_path / "imported" / "config.yaml"), tmp_path / "imported")


def test_python_api_exports_a_run_and_imports_it(tmp_path, learned_run):
    import traduire

    out = traduire.export_transformers(learned_run, tmp_path / "hf")
    back, _ = load_run(traduire.import_model(out, tmp_path / "run"))
    model, _ = load_run(learned_run)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    translator = traduire.Translator.load(learned_run, precision="int8")
    with pytest.raises(Exception, match="int8"):
        traduire.export_transformers(translator, tmp_path / "int8")


def test_import_reads_pytorch_model_bin_as_data(tmp_path):
    """Weights saved the old way (a pickle) are loaded with weights_only: as data, not code."""
    source = make_transformers_model(tmp_path / "hf")
    hf_model, _ = load_transformers(source)
    (source / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), source / "pytorch_model.bin")
    model, tok = load_run(import_model(source, tmp_path / "run"))
    assert_same_logits(model, hf_model, tok)
