"""Showing what analysis.py and the model reveal: attention tables and heatmaps, forced-decoding
scores as text, and the model's size and training state (`traduire info`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.table import Table

from traduire.analysis import AttentionMap, ScoredPair, find_word
from traduire.checkpoint import load_checkpoint, step_checkpoints
from traduire.config import MODEL_PRESETS, load_config
from traduire.errors import TraduireError
from traduire.files import check_line_counts, read_text_lines
from traduire.model import Transformer, TransformerShape
from traduire.monitor import embedding_tables
from traduire.tokenizer import Tokenizer

if TYPE_CHECKING:
    from traduire.translate import Translator


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


# --- Model size --------------------------------------------------------------------------------


def parameter_counts(shape: TransformerShape) -> dict[str, int]:
    """Parameters by component, counting shared embeddings once: embeddings (token tables,
    also the output projection), encoder and decoder (layers and final norm), and total.
    The model is built on the meta device, so even a big one costs no memory or time."""
    with torch.device("meta"):
        model = Transformer(shape)
    tables = embedding_tables(model)

    def body(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if id(p) not in tables)

    counts = {"embeddings": sum(p.numel() for p in tables.values()), "encoder": body(model.encoder),
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
    origin: str | None = None  # where the weights came from: an import, or train.init_from

    def as_record(self) -> dict[str, Any]:
        return {"preset": self.preset, "shape": asdict(self.shape),
                "parameters": self.parameters, "vocab_size": {
                    "source": self.shape.src_vocab_size, "target": self.shape.tgt_vocab_size},
                "checkpoint": self.checkpoint, "train_state": _finite(self.train_state),
                "data": self.data, "origin": self.origin}


def _finite(values: dict[str, Any] | None) -> dict[str, Any] | None:
    """JSON has no infinity: a best loss never measured becomes null."""
    if values is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()}


def model_info(config: Path | None = None, run_dir: Path | None = None,
               overrides: list[str] = ()) -> ModelInfo:
    """Size and state of a model: from a config file alone (vocabulary size taken from
    tokenizer.vocab_size), or from a run directory (its config, SentencePiece vocabulary,
    newest checkpoint and data report). A config given with a run directory wins; overrides
    given with a run directory alone apply to its config.yaml."""
    if config is None and run_dir is None:
        raise TraduireError("give --run-dir DIR or --config FILE")
    if config is None:
        config = Path(run_dir) / "config.yaml"
        if not config.is_file():
            raise TraduireError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(config, list(overrides))
    vocab = (cfg.tokenizer.vocab_size,) * 2
    pad_id = cfg.tokenizer.pad_id
    info_state = checkpoint = data = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        if (run_dir / "tokenizer").is_dir():
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
    shape = TransformerShape.from_config(cfg.model, vocab[0], vocab[1], pad_id)
    return ModelInfo(shape, parameter_counts(shape), cfg.model.preset, info_state, checkpoint,
                     data, _origin(run_dir))


def _origin(run_dir: Path | None) -> str | None:
    """'imported from DIR (class)' or 'fine-tuned from CHECKPOINT (step N)', from the records
    `traduire import` and train.init_from leave in the run directory."""
    if run_dir is None:
        return None
    try:
        if (run_dir / "imported.json").is_file():
            record = json.loads((run_dir / "imported.json").read_text(encoding="utf-8"))
            return f"imported from {record['transformers']} ({record['class']})"
        if (run_dir / "init_from.json").is_file():
            record = json.loads((run_dir / "init_from.json").read_text(encoding="utf-8"))
            return f"fine-tuned from {record['checkpoint']} (step {record['step']:,})"
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged record does not stop `info`
    return None


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


def word_table(amap: AttentionMap, row: int) -> Table:
    """A rich Table: the key words ranked by the weight the word `row` gives them, averaged over
    layers and heads, with a bar, then one column per layer (averaged over its heads)."""
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


def cross_table(amap: AttentionMap) -> Table:
    """A rich Table: for each output word, the source word it attends to most (a soft
    alignment), its weight with a bar, and the runner-up."""
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
    if info.origin:
        lines.append(f"weights: {info.origin}")
    if info.data:
        sizes = ", ".join(f"{split} {r.get('kept', 0):,} pairs (of {r.get('read', 0):,} read)"
                          for split, r in info.data.items() if isinstance(r, dict))
        lines.append(f"data: {sizes}")
    return lines


def _preset_note(info: ModelInfo) -> str:
    """' (preset base)', or which of its values the config overrides."""
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


def attention_record(amap: AttentionMap, sentence: str, row: int | None) -> dict[str, Any]:
    """`traduire attention --json`: the words, then the chosen word's weights (encoder) or
    every output word's (cross)."""
    record: dict[str, Any] = {"sentence": sentence, "kind": amap.kind, "words": amap.cols}
    if amap.kind == "cross":
        record["translation"] = amap.translation
        record["output_words"] = amap.rows
        record["alignment"] = [amap.row_record(r) for r in range(len(amap.rows))]
    elif row is not None:
        record.update(amap.row_record(row))
    return record


def info_json(info: ModelInfo) -> str:
    return json.dumps(info.as_record(), ensure_ascii=False, default=str)


def attention_view(translator: Translator, sentence: str, token: str | None = None,
                   index: int | None = None, cross: bool = False, beam: int = 5,
                   need_word: bool = True) -> tuple[AttentionMap, int | None]:
    """`traduire attention`: the attention map of a sentence and the row of the word asked
    for (None with --cross, or when only a plot is wanted and no word is named)."""
    if token is not None and index is not None:
        raise TraduireError("give --token or --index, not both")
    if cross and (token is not None or index is not None):
        raise TraduireError("--cross shows every output word; drop --token/--index")
    amap = translator.attention(sentence, cross=cross, beam=beam)
    assert isinstance(amap, AttentionMap)
    if cross or (token is None and index is None and not need_word):
        return amap, None
    if token is None and index is None:
        raise TraduireError("give --token WORD or --index N; words: " + " ".join(
            f"{i}:{w}" for i, w in enumerate(amap.rows)))
    return amap, find_word(amap.rows, token, index)


def attention_text(amap: AttentionMap, row: int | None) -> list[Any]:
    """What `traduire attention` prints: the cross-attention table, or the word's table and
    one line per head."""
    if amap.kind == "cross":
        return [f"translation: {amap.translation}", cross_table(amap)]
    if row is None:
        return []
    return [word_table(amap, row), *head_lines(amap, row)]


def score_files(translator: Translator, src: Path, tgt: Path) -> list[ScoredPair]:
    """`traduire score`: forced decoding of two aligned files."""
    sources, targets = read_text_lines(src), read_text_lines(tgt)
    check_line_counts(src, len(sources), tgt, len(targets),
                      "each source line needs its target line")
    return translator.score(sources, targets)
