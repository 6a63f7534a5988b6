"""Models in and out of Hugging Face transformers.

`import_model` turns a transformers model directory (what `save_pretrained` writes: config.json,
the weights, the tokenizer's files) into a traduire run directory that translates, scores and
fine-tunes like any other; `export_transformers` writes a traduire model as such a directory.

Two transformers classes express traduire's network exactly:
  - MarianMTModel (the OPUS-MT models): post-norm layers, sinusoidal positions, the embeddings
    scaled by sqrt(d_model) or not, a bias on the output scores, decoding started from padding;
  - PegasusForConditionalGeneration: the same with pre-norm layers and a final LayerNorm after
    each stack, one embedding matrix for both sides.
Both take MarianTokenizer's files: a SentencePiece model per side and one vocabulary of pieces
(vocab.json) that sets the ids.

Both compute the sinusoidal positions as traduire does but put every sine before every cosine,
where traduire interleaves them (the paper's layout). The two layouts are one encoding with the
model dimensions permuted, and permuting the residual stream's dimensions consistently (in
every matrix that reads or writes it, the LayerNorms and the embeddings) changes no output: so
weights are converted exactly, with no position option in traduire.

The conversions are checked by tests that compare logits and searches with transformers'.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from traduire.checkpoint import save_checkpoint
from traduire.config import Config, config_from_dict, plain
from traduire.errors import TraduireError
from traduire.files import atomic_write_text, check_export_dir, replace_directory
from traduire.loading import build_model
from traduire.model import Transformer
from traduire.pipeline import RUN_FORMAT_VERSION, write_record
from traduire.tokenizer import VOCABULARY_FILE, Tokenizer, Vocabulary
from traduire.translate import Translator

# The transformers class for each arrangement of traduire's layers.
CLASSES = {"post": "MarianMTModel", "pre": "PegasusForConditionalGeneration"}
MODEL_TYPES = {"marian": "post", "pegasus": "pre"}
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish"}


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise TraduireError("this needs Hugging Face transformers: pip install "
                            "'traduire[hf]'") from None
    return transformers


# --- The permutation between the two position layouts --------------------------------------


def marian_order(d_model: int) -> Tensor:
    """Dimension j of a Marian/Pegasus hidden state is dimension order[j] of traduire's: the
    sines (even dimensions here) first, then the cosines (odd ones)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def _weight_map(model: Transformer, prefix: str) -> list[tuple[str, list[str], str]]:
    """(traduire key, transformers keys concatenated along dim 0 into it, which of its axes
    span the residual stream: "rows", "cols" or "none") for every weight."""
    pairs = [("encoder.embedding.weight", [f"{prefix}encoder.embed_tokens.weight"], "cols"),
             ("decoder.embedding.weight", [f"{prefix}decoder.embed_tokens.weight"], "cols")]

    def linear(ours: str, theirs: list[str], axis: str, bias_axis: str) -> None:
        pairs.append((f"{ours}.weight", [f"{t}.weight" for t in theirs], axis))
        pairs.append((f"{ours}.bias", [f"{t}.bias" for t in theirs], bias_axis))

    def norm(ours: str, theirs: str) -> None:
        pairs.append((f"{ours}.weight", [f"{theirs}.weight"], "rows"))
        pairs.append((f"{ours}.bias", [f"{theirs}.bias"], "rows"))

    def ffn(ours: str, theirs: str) -> None:
        linear(f"{ours}.ffn.linear1", [f"{theirs}.fc1"], "cols", "none")
        linear(f"{ours}.ffn.linear2", [f"{theirs}.fc2"], "rows", "rows")
        norm(f"{ours}.ffn_block.norm", f"{theirs}.final_layer_norm")

    def self_attention(ours: str, theirs: str, block: str) -> None:
        linear(f"{ours}.self_attn.qkv_proj", [f"{theirs}.self_attn.{p}_proj" for p in "qkv"],
               "cols", "none")
        linear(f"{ours}.self_attn.out_proj", [f"{theirs}.self_attn.out_proj"], "rows", "rows")
        norm(f"{ours}.{block}.norm", f"{theirs}.self_attn_layer_norm")

    for i in range(len(model.encoder.layers)):
        ours, theirs = f"encoder.layers.{i}", f"{prefix}encoder.layers.{i}"
        self_attention(ours, theirs, "attn_block")
        ffn(ours, theirs)
    for i in range(len(model.decoder.layers)):
        ours, theirs = f"decoder.layers.{i}", f"{prefix}decoder.layers.{i}"
        self_attention(ours, theirs, "self_block")
        linear(f"{ours}.cross_attn.q_proj", [f"{theirs}.encoder_attn.q_proj"], "cols", "none")
        linear(f"{ours}.cross_attn.kv_proj", [f"{theirs}.encoder_attn.{p}_proj" for p in "kv"],
               "cols", "none")
        linear(f"{ours}.cross_attn.out_proj", [f"{theirs}.encoder_attn.out_proj"], "rows", "rows")
        norm(f"{ours}.cross_block.norm", f"{theirs}.encoder_attn_layer_norm")
        ffn(ours, theirs)
    if model.shape.norm == "pre":
        norm("encoder.final_norm", f"{prefix}encoder.layer_norm")
        norm("decoder.final_norm", f"{prefix}decoder.layer_norm")
    return pairs


def _permute(tensor: Tensor, axis: str, index: Tensor) -> Tensor:
    if axis == "rows":
        return tensor[index]
    if axis == "cols":
        return tensor[:, index]
    return tensor


# --- Import --------------------------------------------------------------------------------


def model_config_from(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """traduire's model section for a transformers config (config.json as a dict); a model
    traduire cannot express exactly is refused naming the field."""
    def refuse(field: str, why: str) -> TraduireError:
        return TraduireError(f"{origin}: '{field}' {why}; traduire cannot express this model "
                             "exactly")

    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise refuse("model_type", f"is {model_type!r}; traduire imports "
                     f"{' and '.join(MODEL_TYPES)} models")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"),
                 ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(a) != hf.get(b):
            raise refuse(b, f"({hf.get(b)}) differs from '{a}' ({hf.get(a)})")
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise refuse("activation_function", f"is {activation!r}")
    if not hf.get("tie_word_embeddings", True):
        raise refuse("tie_word_embeddings", "is false (an output matrix of its own)")
    # Fields of older configs that would change the arrangement of the layers.
    for field in ("normalize_before", "normalize_embedding", "add_final_layer_norm",
                  "static_position_embeddings", "add_bias_logits"):
        if hf.get(field):
            raise refuse(field, "is true")
    d_model = hf["d_model"]
    if d_model % 2:
        raise refuse("d_model", f"is odd ({d_model})")
    shared = hf.get("share_encoder_decoder_embeddings", True)
    if model_type == "marian" and not shared and hf.get("decoder_vocab_size") is None:
        raise refuse("decoder_vocab_size", "is missing")
    return {"encoder_layers": hf["encoder_layers"], "decoder_layers": hf["decoder_layers"],
            "layers": max(hf["encoder_layers"], hf["decoder_layers"]),
            "d_model": d_model, "heads": hf["encoder_attention_heads"],
            "ffn_dim": hf["encoder_ffn_dim"], "dropout": float(hf.get("dropout", 0.1)),
            "attention_dropout": float(hf.get("attention_dropout", 0.0)),
            "activation_dropout": float(hf.get("activation_dropout", 0.0)),
            "activation": ACTIVATIONS[activation], "norm": MODEL_TYPES[model_type],
            "max_positions": hf["max_position_embeddings"], "share_embeddings": shared,
            "scale_embedding": bool(hf.get("scale_embedding", False))}


def _read_vocabulary(tokenizer, hf: dict[str, Any], origin: str) -> Vocabulary:
    """The pieces by id of a MarianTokenizer, checked dense and of the model's sizes."""
    def dense(mapping: dict[str, int], size: int, name: str) -> list[str]:
        pieces = [None] * size
        for piece, i in mapping.items():
            if not 0 <= i < size or pieces[i] is not None:
                raise TraduireError(f"{origin}: {name}: id {i} of {piece!r} is outside the "
                                    f"model's {size} ids or given twice")
            pieces[i] = piece
        if None in pieces:
            raise TraduireError(f"{origin}: {name} has no piece for id {pieces.index(None)}")
        return pieces

    src = dense(tokenizer.encoder, hf["vocab_size"], "vocab.json")
    tgt = src
    if getattr(tokenizer, "separate_vocabs", False):
        tgt = dense(tokenizer.target_encoder, hf.get("decoder_vocab_size") or hf["vocab_size"],
                    "target_vocab.json")
    elif not hf.get("share_encoder_decoder_embeddings", True) and \
            hf.get("decoder_vocab_size", hf["vocab_size"]) != hf["vocab_size"]:
        raise TraduireError(f"{origin}: 'decoder_vocab_size' differs from the one vocabulary "
                            "of the tokenizer")
    start = hf.get("decoder_start_token_id", hf["pad_token_id"])
    return Vocabulary(src, tgt, pad_id=hf["pad_token_id"],
                      unk_id=tokenizer.encoder[str(tokenizer.unk_token)],
                      bos_id=start, eos_id=hf["eos_token_id"])


def import_model(directory: str | Path, run_dir: str | Path) -> Path:
    """Make `run_dir` a traduire run of the transformers model saved in `directory` (Marian or
    Pegasus, with a MarianTokenizer's files): its tokenizer and model stages done, best.pt
    holding the weights. Nothing is read from the network. Returns the run directory."""
    transformers = transformers_module()
    directory, run_dir = Path(directory), Path(run_dir)
    config_file = directory / "config.json"
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraduireError(f"{config_file}: not found; expected a directory written by "
                            "transformers' save_pretrained") from None
    except (OSError, ValueError) as e:
        raise TraduireError(f"{config_file}: unreadable ({e})") from None
    model_section = model_config_from(hf, str(config_file))
    for name in ("source.spm", "target.spm", "vocab.json"):
        if not (directory / name).is_file():
            raise TraduireError(f"{directory / name}: not found; traduire imports models with "
                                "a MarianTokenizer's files (source.spm, target.spm, vocab.json)")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise TraduireError(f"{run_dir}: exists and is not empty; nothing was written. Choose "
                            "a new or empty --run-dir")

    with _quiet(transformers):
        tokenizer = transformers.MarianTokenizer.from_pretrained(str(directory))
        # from_pretrained refuses pickled weights (pytorch_model.bin) unless torch loads them
        # with weights_only; safetensors are read as data.
        hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            str(directory), local_files_only=True)
    vocabulary = _read_vocabulary(tokenizer, hf, str(directory))
    config = config_from_dict({
        "data": {"source": "none"},
        "tokenizer": {"vocab_size": len(vocabulary.src), "joint": model_section[
            "share_embeddings"]},
        "model": model_section}, str(config_file))
    with replace_directory(run_dir) as out:
        (out / "tokenizer").mkdir()
        shutil.copyfile(directory / "source.spm", out / "tokenizer" / "spm.src.model")
        shutil.copyfile(directory / "target.spm", out / "tokenizer" / "spm.tgt.model")
        vocabulary.save(out / "tokenizer" / VOCABULARY_FILE)
        tok = Tokenizer.load(out / "tokenizer")
        model = build_model(config, tok)
        state = hf_model.state_dict()
        bias = state.get("final_logits_bias")
        if bias is not None and bias.any():
            config = config_from_dict({**config.to_dict(), "model": {
                **config.to_dict()["model"], "output_bias": True}}, str(config_file))
            model = build_model(config, tok)
        _check_positions(hf_model, model, str(directory))
        load_transformers_state(model, state)
        _write_run(out, config, model, tok, {"transformers": str(directory.resolve()),
                                             "class": type(hf_model).__name__})
    return run_dir


def _check_positions(hf_model, model: Transformer, origin: str) -> None:
    """Marian recomputes its sinusoids when it loads; Pegasus saves them with the weights, so a
    file could hold others. traduire's are fixed: anything else is refused."""
    expected = model.encoder.positions.table[:, marian_order(model.shape.d_model)]
    for stack in ("encoder", "decoder"):
        table = getattr(hf_model.model, stack).embed_positions.weight.detach().float()
        if table.shape != expected.shape or not torch.allclose(table, expected, atol=1e-6):
            raise TraduireError(f"{origin}: 'model.{stack}.embed_positions' are not the "
                                "sinusoidal positions; traduire cannot express this model "
                                "exactly")


def load_transformers_state(model: Transformer, state: dict[str, Tensor]) -> None:
    """Copy a Marian or Pegasus state dict (keys under "model.") into `model`."""
    inverse = torch.argsort(marian_order(model.shape.d_model))
    ours = {}
    for key, theirs, axis in _weight_map(model, "model."):
        ours[key] = _permute(torch.cat([state[k].float() for k in theirs]), axis, inverse)
    if model.output_bias is not None:
        ours["output_bias"] = state["final_logits_bias"].float().reshape(-1)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:  # every weight of the network is named in _weight_map
        raise TraduireError(f"weights left unconverted: {missing or unexpected}")


def _write_run(out: Path, config: Config, model: Transformer, tok: Tokenizer,
               origin: dict[str, str]) -> None:
    """The files of a run directory whose tokenizer and model stages are done."""
    atomic_write_text(out / "run.json", json.dumps({"format_version": RUN_FORMAT_VERSION}) + "\n")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(plain(config.to_dict()),
                                                          sort_keys=False))
    atomic_write_text(out / "imported.json", json.dumps(origin, indent=2) + "\n")
    for stage in ("tokenizer", "model"):
        write_record(out, stage, config)
    save_checkpoint(out / "best.pt", {"model": model.state_dict(), "config": config.to_dict(),
                                      "vocabulary": tok.fingerprint(),
                                      "train_state": {"step": 0}, "imported_from": origin})


class _quiet:
    """transformers' own warnings (sacremoses missing, and the like) and progress bars kept off
    the console: traduire says in one line what it did."""

    def __init__(self, transformers) -> None:
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        import warnings

        self.level = self.logging.get_verbosity()
        self.bars = self.logging.is_progress_bar_enabled()
        self.logging.set_verbosity_error()
        self.logging.disable_progress_bar()
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc) -> None:
        self.warnings.__exit__(*exc)
        self.logging.set_verbosity(self.level)
        if self.bars:
            self.logging.enable_progress_bar()


# --- Export --------------------------------------------------------------------------------


def transformers_config(model: Transformer, tok: Tokenizer) -> dict[str, Any]:
    """The transformers config (as keyword arguments) of `model`, or a one-line refusal naming
    what no transformers class expresses."""
    shape = model.shape
    if shape.norm == "pre" and not shape.share_embeddings:
        raise TraduireError("a pre-norm model with separate embeddings ('model.share_embeddings: "
                            "false'): no transformers class has pre-norm layers and two "
                            "embedding matrices")
    if shape.d_model % 2:
        raise TraduireError(f"'model.d_model' is odd ({shape.d_model}): transformers' "
                            "sinusoidal positions need an even size")
    common = dict(
        d_model=shape.d_model, encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers, encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim, activation_function=shape.activation,
        dropout=shape.dropout, attention_dropout=shape.attention_dropout,
        activation_dropout=shape.activation_dropout,
        max_position_embeddings=shape.max_positions, scale_embedding=shape.scale_embedding,
        vocab_size=shape.src_vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
        decoder_start_token_id=tok.bos_id, forced_eos_token_id=tok.eos_id,
        tie_word_embeddings=True, is_encoder_decoder=True)
    if shape.norm == "post":
        common.update(share_encoder_decoder_embeddings=shape.share_embeddings,
                      decoder_vocab_size=shape.tgt_vocab_size)
    return common


def export_transformers(run: Translator | str | Path, out_dir: str | Path,
                        checkpoint: str | Path | None = None, force: bool = False) -> Path:
    """Write a run's model (its average.pt or best.pt, or `checkpoint`), or a Translator's,
    as a transformers directory: `traduire export --format transformers`. Returns it."""
    translator = run if isinstance(run, Translator) else Translator.load(
        run, checkpoint, device="cpu", precision="fp32")
    if hasattr(translator.model, "int8_projection"):
        raise TraduireError("an int8 Translator cannot be exported; load it in fp32 or bf16")
    return write_transformers(translator.model, translator.tokenizer, out_dir, force)


def write_transformers(model: Transformer, tok: Tokenizer, out_dir: str | Path,
                       force: bool = False) -> Path:
    """Write `model` and its tokenizer as a transformers directory (weights in safetensors)
    that AutoModelForSeq2SeqLM and AutoTokenizer load offline; returns it."""
    transformers = transformers_module()
    out_dir = Path(out_dir)
    check_export_dir(out_dir, "config.json", "transformers", force)
    kwargs = transformers_config(model, tok)
    if model.shape.norm == "post":
        hf_config, cls = transformers.MarianConfig(**kwargs), transformers.MarianMTModel
    else:
        hf_config = transformers.PegasusConfig(**kwargs)
        cls = transformers.PegasusForConditionalGeneration
    never = [[tok.pad_id]] + ([[tok.bos_id]] if tok.bos_id != tok.pad_id else [])
    with _quiet(transformers), replace_directory(out_dir) as tmp:
        hf_model = cls(hf_config).eval()
        hf_model.load_state_dict(transformers_state(model, hf_model.state_dict()))
        # traduire never emits padding or its start token; a transformers search told so
        # explores the same hypotheses.
        hf_model.generation_config = transformers.GenerationConfig(
            decoder_start_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
            bad_words_ids=never, num_beams=5, max_length=model.shape.max_positions)
        hf_model.save_pretrained(str(tmp))
        _save_tokenizer(transformers, tok, tmp, model.shape.max_positions)
    return out_dir


def transformers_state(model: Transformer, template: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers state dict (keys as in `template`, a fresh model's) of `model`'s weights."""
    order = marian_order(model.shape.d_model)
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    state = dict(template)
    for key, theirs, axis in _weight_map(model, "model."):
        for name, part in zip(theirs, _permute(ours[key], axis, order).chunk(len(theirs))):
            state[name] = part.clone()
    shared = state["model.decoder.embed_tokens.weight"]
    state["lm_head.weight"] = shared
    if "model.shared.weight" in state:
        state["model.shared.weight"] = shared
    bias = ours.get("output_bias")
    state["final_logits_bias"] = (bias.reshape(1, -1) if bias is not None
                                  else torch.zeros_like(template["final_logits_bias"]))
    return state


def _save_tokenizer(transformers, tok: Tokenizer, out: Path, max_positions: int) -> None:
    """MarianTokenizer's files: the SentencePiece models and the vocabularies of the ids."""
    source = tok.src.serialized_model_proto()
    target = tok.tgt.serialized_model_proto()
    (out / "source.spm").write_bytes(source)
    (out / "target.spm").write_bytes(target)
    src = tok.src_pieces(list(range(tok.src_vocab_size)))
    tgt = tok.tgt_pieces(list(range(tok.tgt_vocab_size)))
    separate = src != tgt
    (out / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(src)},
                                               ensure_ascii=False), encoding="utf-8")
    extra = {}
    if separate:
        (out / "target_vocab.json").write_text(json.dumps(
            {p: i for i, p in enumerate(tgt)}, ensure_ascii=False), encoding="utf-8")
        extra["target_vocab_file"] = str(out / "target_vocab.json")
    tokenizer = transformers.MarianTokenizer(
        str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"),
        separate_vocabs=separate, unk_token=src[tok.unk_id], eos_token=src[tok.eos_id],
        pad_token=src[tok.pad_id], model_max_length=max_positions, **extra)
    tokenizer.save_pretrained(str(out))

