"""Looking inside a trained model: attention weights, forced-decoding scores, parameter counts.

Words and subwords. The model sees SentencePiece pieces; people read words. A word here is a
piece that starts with "▁" (SentencePiece's mark for "a space came before this") together with
the pieces after it up to the next such piece, so words are the whitespace-separated tokens of
the sentence and punctuation attached to a word stays with it ("tired." is one word). The
end-of-sentence token the model appends is a word of its own, "</s>": attention may land on
it, and keeping it makes every row of weights still sum to 1.

Merging attention from pieces to words (`merge_attention`):
  * attention *to* a word is the SUM of the weights to its pieces (the share of attention the
    word received as a whole);
  * attention *from* a word is the MEAN of the rows of its pieces (each piece's row sums to 1,
    so their mean does too).
Hence each word's row of merged weights still sums to 1.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from traduire.data import collate
from traduire.errors import TraduireError
from traduire.model import Attention, Transformer, TransformerShape

if TYPE_CHECKING:
    from traduire.config import Config
    from traduire.search import Hypothesis
    from traduire.translate import Translator

WORD_START = "▁"  # U+2581, SentencePiece's word-start mark
EOS_WORD = "</s>"
# A source word whose attention received, summed over all target steps and averaged over
# layers and heads, is below this counts as "barely looked at" (see `confidence`).
LOW_ATTENTION_THRESHOLD = 0.1


# --- Words from pieces -------------------------------------------------------------------------


def group_pieces(pieces: list[str]) -> list[list[int]]:
    """Indices of the pieces of each word: a new word starts at the first piece, at every
    piece beginning with "▁", and at (and after) an "</s>" piece."""
    words: list[list[int]] = []
    for i, piece in enumerate(pieces):
        starts = (not words or piece.startswith(WORD_START) or piece == EOS_WORD
                  or pieces[i - 1] == EOS_WORD)
        if starts:
            words.append([i])
        else:
            words[-1].append(i)
    return words


def word_labels(pieces: list[str], spans: list[list[int]], text: str | None = None
                ) -> list[str]:
    """A label per word: the sentence's own whitespace-separated words when they line up with
    the pieces (so normalisation and unknown pieces do not show), else the joined pieces."""
    from_pieces = ["".join(pieces[i] for i in span).replace(WORD_START, " ").strip() or WORD_START
                   for span in spans]
    if text is not None:
        real = [s for s in spans if pieces[s[0]] != EOS_WORD]
        words = text.split()
        if len(words) == len(real):
            return words + [EOS_WORD] * (len(spans) - len(real))
    return from_pieces


def merge_attention(weights: Tensor, query_spans: list[list[int]], key_spans: list[list[int]]
                    ) -> Tensor:
    """Piece-level weights (..., queries, keys) to word level (..., query words, key words):
    attention to a word sums over its pieces, attention from a word averages over its pieces."""
    q_len, k_len = weights.shape[-2:]
    to_word = torch.zeros(k_len, len(key_spans), dtype=weights.dtype)
    for w, span in enumerate(key_spans):
        to_word[span, w] = 1.0
    from_word = torch.zeros(len(query_spans), q_len, dtype=weights.dtype)
    for w, span in enumerate(query_spans):
        from_word[w, span] = 1.0 / len(span)
    return from_word @ weights @ to_word


def normalise_word(word: str) -> str:
    """Lower case, punctuation removed: how --token is matched against the words."""
    return "".join(c for c in word.casefold() if not unicodedata.category(c).startswith("P"))


def find_word(words: list[str], token: str | None = None, index: int | None = None) -> int:
    """The position of the word named by `token` (first match, case and punctuation ignored)
    or by `index` (0-based). Raises TraduireError listing the words when there is none."""
    listing = " ".join(f"{i}:{w}" for i, w in enumerate(words))
    if index is not None:
        if not 0 <= index < len(words):
            raise TraduireError(f"--index {index} is out of range; words: {listing}")
        return index
    wanted = normalise_word(token or "")
    for i, word in enumerate(words):
        if normalise_word(word) == wanted:
            return i
    raise TraduireError(f"--token {token!r} is not a word of the sentence; words: {listing}")


# --- Attention maps ----------------------------------------------------------------------------


@dataclass
class AttentionMap:
    """Word-level attention of one sentence: weights (layers, heads, rows, cols), each row a
    query word's distribution over the key words (rows sum to 1)."""

    kind: str  # "encoder" (source -> source) or "cross" (output word -> source)
    rows: list[str]
    cols: list[str]
    weights: Tensor
    translation: str | None = None  # the model's own translation, for "cross"

    @property
    def average(self) -> Tensor:
        """(rows, cols): averaged over layers and heads."""
        return self.weights.mean(dim=(0, 1))

    def row_record(self, row: int) -> dict[str, Any]:
        """JSON-ready detail of one query word: average, per layer and per head."""
        def pairs(values: Tensor) -> list[list[Any]]:
            return [[w, round(float(v), 6)] for w, v in zip(self.cols, values)]

        layers = [{"layer": layer + 1, "average": pairs(self.weights[layer, :, row].mean(0)),
                   "heads": [pairs(self.weights[layer, h, row])
                             for h in range(self.weights.size(1))]}
                  for layer in range(self.weights.size(0))]
        return {"word": self.rows[row], "index": row, "average": pairs(self.average[row]),
                "layers": layers}


def _source_tensor(translator: Translator, sentence: str) -> tuple[list[int], list[str]]:
    ids, _ = translator.encode([sentence])
    tok = translator.tokenizer
    pieces = [tok.src.id_to_piece(i) for i in ids[0]] + [EOS_WORD]
    return ids[0], pieces


@torch.inference_mode()
def attention_map(translator: Translator, sentence: str, cross: bool = False, beam: int = 5
                  ) -> AttentionMap:
    """Encoder self-attention among the words of `sentence`, or (cross=True) the decoder's
    cross-attention from each word of the model's own translation (found by beam search) to the
    source words. In the cross map the row of an output word is the attention of the decoder
    step that *predicted* it; the last row, "</s>", is the step that ended the sentence."""
    from traduire.translate import DecodeOptions

    if not sentence.strip():
        raise TraduireError("the sentence is empty")
    src_ids, src_pieces = _source_tensor(translator, sentence)
    src_spans = group_pieces(src_pieces)
    src_words = word_labels(src_pieces, src_spans, sentence)
    if not cross:
        weights = _forward_attention(translator, [src_ids], [[]]).encoder
        stacked = torch.stack([w[0] for w in weights]).float().cpu()
        return AttentionMap("encoder", src_words, src_words,
                            merge_attention(stacked, src_spans, src_spans))
    hyp = translator.translate_ids([src_ids], DecodeOptions(beam=beam))[0][0]
    tgt_pieces = translator.tokenizer.tgt_pieces(hyp.tokens) + [EOS_WORD]
    tgt_spans = group_pieces(tgt_pieces)
    text = translator.tokenizer.decode_tgt([hyp.tokens])[0]
    weights = _forward_attention(translator, [src_ids], [hyp.tokens]).decoder_cross
    stacked = torch.stack([w[0] for w in weights]).float().cpu()
    return AttentionMap("cross", word_labels(tgt_pieces, tgt_spans, text), src_words,
                        merge_attention(stacked, tgt_spans, src_spans), translation=text)


def _forward_attention(translator: Translator, src_ids: list[list[int]],
                       tgt_ids: list[list[int]]) -> Attention:
    """One teacher-forced forward pass that keeps every attention weight."""
    tok = translator.tokenizer
    batch = collate(src_ids, tgt_ids, pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id)
    batch = batch.to(translator.device)
    attention = Attention([], [], [])
    translator.model(batch.src, batch.tgt_in, attention=attention)
    return attention


# --- Drawing -----------------------------------------------------------------------------------


def plot_attention(amap: AttentionMap, path: Path, panels: str = "layers", layer: int = -1
                   ) -> None:
    """Heatmaps with the words on both axes: one panel per layer (averaged over its heads) or,
    with panels="heads", one per head of `layer`. Needs matplotlib (`traduire[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TraduireError("--plot needs matplotlib: pip install 'traduire[plot]'") from None
    if panels == "layers":
        grids = amap.weights.mean(dim=1)
        titles = [f"layer {i + 1}" for i in range(grids.size(0))]
    elif panels == "heads":
        n_layers = amap.weights.size(0)
        if not -n_layers <= layer < n_layers:
            raise TraduireError(f"--layer {layer + 1} is out of range (1..{n_layers})")
        grids = amap.weights[layer]
        titles = [f"layer {layer % n_layers + 1}, head {h + 1}" for h in range(grids.size(0))]
    else:
        raise TraduireError(f"--panels {panels!r}: expected layers or heads")
    n = grids.size(0)
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    # About a third of an inch per word, plus room for the labels.
    width, height = 0.35 * len(amap.cols) + 1.5, 0.35 * len(amap.rows) + 1.5
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, grid, title in zip(axes.flat, grids, titles):
        ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(amap.cols)), amap.cols, rotation=90)
        ax.set_yticks(range(len(amap.rows)), amap.rows)
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- Forced decoding ---------------------------------------------------------------------------


@dataclass
class ScoredPair:
    """How probable the model finds `target` as a translation of `source`."""

    source: str
    target: str
    pieces: list[str]  # target pieces, then "</s>"
    token_logprobs: list[float]  # one per piece

    @property
    def logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / len(self.token_logprobs))

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)

    def as_record(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target,
                "logprob": round(self.logprob, 6), "perplexity": round(self.perplexity, 6),
                "probability": self.probability,
                "tokens": [[p, round(lp, 6)] for p, lp in zip(self.pieces,
                                                               self.token_logprobs)]}


def score_pairs(translator: Translator, sources: list[str], targets: list[str],
                batch_size: int = 64) -> list[ScoredPair]:
    """Forced decoding: the log-probability of each target token (and of EOS) given the source
    and the target prefix, from batched teacher-forced forward passes. The figures are those
    beam search computes for the same output: log_softmax of the logits, nothing renormalised."""
    if len(sources) != len(targets):
        raise TraduireError(f"{len(sources)} source lines but {len(targets)} target lines")
    tok = translator.tokenizer
    src_ids, _ = translator.encode(sources)
    tgt_ids = tok.encode_tgt(targets)
    limit = translator.model.shape.max_positions
    for number, ids in enumerate(tgt_ids, 1):
        if len(ids) + 1 > limit:
            raise TraduireError(f"target line {number} has {len(ids)} tokens; the model takes "
                                f"at most {limit - 1}")
    scores = score_ids(translator, src_ids, tgt_ids, batch_size)
    return [ScoredPair(s, t, tok.tgt_pieces(ids) + [EOS_WORD], lps)
            for s, t, ids, lps in zip(sources, targets, tgt_ids, scores)]


@torch.inference_mode()
def score_ids(translator: Translator, src_ids: list[list[int]], tgt_ids: list[list[int]],
              batch_size: int = 64) -> list[list[float]]:
    """Per pair of token-id lists, the log-probability of each target token and then of EOS;
    pairs are batched by length."""
    tok = translator.tokenizer
    results: list[list[float]] = [[] for _ in src_ids]
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]) + len(tgt_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([src_ids[i] for i in chunk], [tgt_ids[i] for i in chunk],
                        pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id).to(translator.device)
        logprobs = translator.model(batch.src, batch.tgt_in).float().log_softmax(-1)
        picked = logprobs.gather(2, batch.tgt_out[..., None]).squeeze(2).cpu()
        for row, i in enumerate(chunk):
            results[i] = picked[row, :len(tgt_ids[i]) + 1].tolist()
    return results


# --- Confidence --------------------------------------------------------------------------------


@torch.inference_mode()
def confidence(translator: Translator, src_ids: list[list[int]], best: list[Hypothesis],
               threshold: float = LOW_ATTENTION_THRESHOLD) -> list[dict[str, float]]:
    """Two cheap signals of a doubtful translation, per sentence:

    mean_logprob: the mean log-probability of the best hypothesis's tokens (EOS included).
    low_attention_share: the share of source words (EOS excluded) whose *coverage* is below
      `threshold`, where a word's coverage is the cross-attention it received summed over every
      target step (the EOS step included) and averaged over layers and heads (Tu et al., 2016).
      A word every step ignores may have been left untranslated. Each target step hands out
      1 in total, so an output of T steps spreads T over the source words.
    """
    attention = _forward_attention(translator, src_ids, [h.tokens for h in best])
    # (batch, layers, heads, tgt, src) -> summed over target steps -> averaged: (batch, src).
    cross = torch.stack(attention.decoder_cross, dim=1).float()
    tgt_lengths = [len(h.tokens) + 1 for h in best]
    out = []
    for row, (ids, hyp) in enumerate(zip(src_ids, best)):
        per_piece = cross[row, :, :, :tgt_lengths[row], :len(ids)].sum(2).mean((0, 1)).cpu()
        pieces = [translator.tokenizer.src.id_to_piece(i) for i in ids]
        spans = group_pieces(pieces)
        coverage = [float(per_piece[span].sum()) for span in spans]
        low = sum(c < threshold for c in coverage) / max(len(coverage), 1)
        # logprob / (tokens + EOS): per-token log-probabilities need not be known (an engine
        # such as CTranslate2 reports only the total).
        out.append({"mean_logprob": round(hyp.logprob / (len(hyp.tokens) + 1), 6),
                    "low_attention_share": round(low, 6)})
    return out


# --- Model size --------------------------------------------------------------------------------


def parameter_counts(shape: TransformerShape) -> dict[str, int]:
    """Parameters by component, counting shared embeddings once: embeddings (token tables,
    also the output projection), encoder and decoder (layers and final norm), and total.
    The model is built on the meta device, so even a big one costs no memory or time."""
    with torch.device("meta"):
        model = Transformer(shape)
    embedding_ids = {id(model.encoder.embedding.weight), id(model.decoder.embedding.weight)}
    embeddings = sum(p.numel() for p in {id(p): p for p in (model.encoder.embedding.weight,
                                                            model.decoder.embedding.weight)
                                         }.values())

    def body(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if id(p) not in embedding_ids)

    counts = {"embeddings": embeddings, "encoder": body(model.encoder),
              "decoder": body(model.decoder)}
    counts["total"] = model.num_parameters()
    return counts


@dataclass
class ModelInfo:
    shape: TransformerShape
    parameters: dict[str, int]
    preset: str | None = None
    train_state: dict[str, Any] | None = None
    checkpoint: str | None = None
    data: dict[str, Any] | None = None

    def as_record(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"preset": self.preset, "shape": asdict(self.shape),
                "parameters": self.parameters, "vocab_size": {
                    "source": self.shape.src_vocab_size, "target": self.shape.tgt_vocab_size},
                "checkpoint": self.checkpoint, "train_state": _finite(self.train_state),
                "data": self.data}


def _finite(values: dict[str, Any] | None) -> dict[str, Any] | None:
    """JSON has no infinity: a best loss never measured becomes null."""
    if values is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()}


def model_shape(config: Config, src_vocab: int, tgt_vocab: int, pad_id: int
                ) -> TransformerShape:
    """The network a config describes (the same mapping as train.build_model)."""
    from traduire.config import encoder_decoder_layers

    m = config.model
    encoder_layers, decoder_layers = encoder_decoder_layers(m)
    return TransformerShape(
        src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, d_model=m.d_model, heads=m.heads,
        ffn_dim=m.ffn_dim, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        dropout=m.dropout, attention_dropout=m.attention_dropout,
        activation_dropout=m.activation_dropout, activation=m.activation, norm=m.norm,
        max_positions=m.max_positions, share_embeddings=m.share_embeddings, pad_id=pad_id)


def model_info(config: Config | None = None, run_dir: Path | None = None) -> ModelInfo:
    """Size and state of a model: from a config alone (vocabulary size taken from
    tokenizer.vocab_size), or from a run directory (its config, SentencePiece vocabulary,
    newest checkpoint and data report). A config given with a run directory wins."""
    import json

    from traduire.checkpoint import load_checkpoint, step_checkpoints
    from traduire.config import load_config

    if config is None and run_dir is None:
        raise TraduireError("give --run-dir DIR or --config FILE")
    if config is None:
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise TraduireError(f"{run_dir}: no config.yaml (not a run directory)")
        config = load_config(path)
    vocab = (config.tokenizer.vocab_size,) * 2
    pad_id = config.tokenizer.pad_id
    info_state = checkpoint = data = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        if (run_dir / "tokenizer").is_dir():
            from traduire.tokenizer import Tokenizer

            tok = Tokenizer.load(run_dir / "tokenizer")
            vocab, pad_id = (tok.src_vocab_size, tok.tgt_vocab_size), tok.pad_id
        newest = step_checkpoints(run_dir / "checkpoints")
        path = newest[-1] if newest else run_dir / "best.pt"
        if path.is_file():
            info_state = dict(load_checkpoint(path).get("train_state", {}))
            checkpoint = str(path)
        report = run_dir / "data" / "report.json"
        if report.is_file():
            data = json.loads(report.read_text(encoding="utf-8"))
    shape = model_shape(config, vocab[0], vocab[1], pad_id)
    return ModelInfo(shape, parameter_counts(shape), getattr(config.model, "preset", None),
                     info_state, checkpoint, data)


def iter_ranked(values: Iterable[float]) -> list[int]:
    """Indices sorted by value, largest first (stable)."""
    values = list(values)
    return sorted(range(len(values)), key=lambda i: -values[i])


# --- Text output -------------------------------------------------------------------------------

_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(weight: float, width: int = 20) -> str:
    """A horizontal bar of `width` characters for a weight in [0, 1], in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, weight)) * width * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def word_table(amap: AttentionMap, row: int):
    """A rich Table: the key words ranked by the weight the word `row` gives them, averaged over
    layers and heads, with a bar, then one column per layer (averaged over its heads)."""
    from rich.table import Table

    title = (f"encoder self-attention from {amap.rows[row]!r} (word {row}), "
             "averaged over layers and heads")
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("word")
    table.add_column("weight", justify="right")
    table.add_column("")
    layers = amap.weights[:, :, row].mean(1)  # (layers, cols)
    for layer in range(layers.size(0)):
        table.add_column(f"L{layer + 1}", justify="right")
    average = amap.average[row].tolist()
    for rank, col in enumerate(iter_ranked(average), 1):
        table.add_row(str(rank), amap.cols[col], f"{average[col]:.3f}", bar(average[col]),
                      *(f"{float(layers[layer, col]):.2f}" for layer in range(layers.size(0))))
    return table


def head_lines(amap: AttentionMap, row: int, top: int = 3) -> list[str]:
    """One line per layer and head: the words it weighs most from `row`."""
    lines = []
    for layer in range(amap.weights.size(0)):
        for head in range(amap.weights.size(1)):
            values = amap.weights[layer, head, row].tolist()
            best = ", ".join(f"{amap.cols[c]} {values[c]:.2f}" for c in iter_ranked(values)[:top])
            lines.append(f"layer {layer + 1} head {head + 1}: {best}")
    return lines


def cross_table(amap: AttentionMap):
    """A rich Table: for each output word, the source word it attends to most (a soft
    alignment), its weight with a bar, and the runner-up."""
    from rich.table import Table

    table = Table(title="cross-attention (output word -> source words), averaged over layers "
                  "and heads", title_justify="left", box=None, pad_edge=False)
    for name, justify in (("output", "left"), ("source", "left"), ("weight", "right"),
                          ("", "left"), ("next", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row, word in enumerate(amap.rows):
        values = amap.average[row].tolist()
        ranked = iter_ranked(values)
        runner = (f"{amap.cols[ranked[1]]} {values[ranked[1]]:.2f}" if len(ranked) > 1 else "")
        table.add_row(word, amap.cols[ranked[0]], f"{values[ranked[0]]:.3f}",
                      bar(values[ranked[0]]), runner)
    return table


def info_lines(info: ModelInfo) -> list[str]:
    """`traduire info` as text."""
    s, p = info.shape, info.parameters
    vocab = (f"{s.src_vocab_size:,}" if s.share_embeddings or s.src_vocab_size == s.tgt_vocab_size
             else f"{s.src_vocab_size:,} source, {s.tgt_vocab_size:,} target")
    lines = [f"model: {s.encoder_layers}+{s.decoder_layers} layers, d_model {s.d_model}, "
             f"{s.heads} heads, ffn {s.ffn_dim}, dropout {s.dropout}, {s.norm}-norm"
             + _preset_note(info),
             f"vocabulary: {vocab} pieces"
             + (" (shared embeddings, tied output projection)" if s.share_embeddings else ""),
             "parameters:"]
    for name in ("embeddings", "encoder", "decoder", "total"):
        lines.append(f"  {name:<11}{p[name]:>14,}  ({p[name] / 1e6:.1f}M)")
    if info.train_state is not None:
        t = info.train_state
        best_bleu = t.get("best_valid_bleu", -1.0)
        lines.append(f"training: step {t.get('step', 0):,}, epoch {t.get('epoch', 0)}, "
                     f"best valid loss {t.get('best_valid_loss', math.inf):.3f}"
                     + (f", best valid BLEU {best_bleu:.2f}" if best_bleu >= 0 else "")
                     + f" ({info.checkpoint})")
    if info.data:
        sizes = ", ".join(f"{split} {r.get('kept', 0):,} pairs (of {r.get('read', 0):,} read)"
                          for split, r in info.data.items() if isinstance(r, dict))
        lines.append(f"data: {sizes}")
    return lines


def _preset_note(info: ModelInfo) -> str:
    """' (preset base)', or which of its values the config overrides."""
    from traduire.config import MODEL_PRESETS

    if info.preset is None:
        return ""
    s = info.shape
    actual = {"layers": s.encoder_layers if s.encoder_layers == s.decoder_layers else None,
              "d_model": s.d_model, "heads": s.heads, "ffn_dim": s.ffn_dim,
              "dropout": s.dropout}
    changed = [k for k, v in MODEL_PRESETS[info.preset].items() if actual[k] != v]
    return f" (preset {info.preset}" + (f", overridden: {', '.join(changed)})" if changed
                                        else ")")


def score_lines(number: int, pair: ScoredPair) -> list[str]:
    """`traduire score` as text: a summary line, then each piece with its log-probability."""
    return [f"{number}\tlogprob {pair.logprob:.4f}\tppl {pair.perplexity:.3f}\t"
            f"p {pair.probability:.3g}\t{pair.target}",
            "\t" + " ".join(f"{p}:{lp:.3f}" for p, lp in zip(pair.pieces, pair.token_logprobs))]
