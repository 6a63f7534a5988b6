"""The `traduire` command line: parse arguments, load the config, call library functions.

Errors a user can fix (TraduireError) are printed as one line on stderr with exit status 1;
`--debug` shows the full traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from traduire.errors import TraduireError

app = typer.Typer(
    help="Train Transformer translation models and translate with them.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]})
stderr = Console(stderr=True)
_debug = False


@app.callback()
def _global(debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks instead of one-line errors.")] = False) -> None:
    global _debug
    _debug = debug


def command(fn):
    """Register a subcommand whose user errors end in one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TraduireError as e:
            if _debug:
                raise
            stderr.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            if not _debug and _failed_elsewhere(e):
                # This rank only saw a peer vanish; the peer's own error is the one to read.
                stderr.print(f"rank {_rank()}: stopping because another rank failed")
                raise typer.Exit(1) from None
            if not isinstance(e, OSError) or _debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            stderr.print(f"[bold red]error:[/] {escape(where + str(e.strerror or e))}",
                         highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return app.command()(wrapper)


def _failed_elsewhere(error: Exception) -> bool:
    """Whether this is a collective operation failing because another rank died."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    message = str(error)
    return isinstance(error, dist.DistError) or any(
        sign in message for sign in ("Connection closed by peer", "Connection reset by peer",
                                     "remote worker crashing", "NCCL communicator was aborted"))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


RunDir = Annotated[Path, typer.Option("--run-dir", "-r", help="Run directory: everything a run "
                                      "makes is written here.")]


@command
def train(
    run_dir: RunDir,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config. Optional when resuming: the run directory's "
        "config.yaml is used.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set model.layers=6 "
        "--set train.max_time=30m. Repeatable.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Redo the first stage whose settings changed and every stage after it; old "
        "outputs are moved to RUN_DIR/old/.")] = False,
) -> None:
    """Prepare data, train the tokenizer, and train (or resume training) the model."""
    from traduire.config import load_config
    from traduire.pipeline import run

    if config is None:
        config = run_dir / "config.yaml"
        if not config.exists():
            raise TraduireError(f"{run_dir} has no config.yaml yet: give --config")
    from traduire import distributed
    from traduire.train import TrainingInterrupted

    cfg = load_config(config, set_ or [])
    try:
        state = run(cfg, run_dir, overwrite=overwrite)
        distributed.shutdown()
    except TrainingInterrupted as stop:
        # markup off: a path may hold '[...]'; soft_wrap: one line, even in a log file
        stderr.print(f"stopped by {stop.signal_name} at step {stop.step}; checkpoint "
                     f"{stop.checkpoint}. To resume: traduire train --run-dir {run_dir}",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130 if stop.signal_name == "SIGINT" else 143) from None
    stderr.print(f"done: step {state.step}, epoch {state.epoch}, best valid loss "
                 f"{state.best_valid_loss:.3f}; checkpoints in {run_dir / 'checkpoints'}",
                 markup=False, highlight=False, soft_wrap=True)


# --- translate and eval -------------------------------------------------------------------------

Beam = Annotated[int, typer.Option(help="Beam size; 1 is greedy search.")]
Nbest = Annotated[int, typer.Option(help="Hypotheses to output per sentence (<= beam).")]
Lenpen = Annotated[float, typer.Option(help="Length penalty exponent alpha of "
                                       "((5+|y|)/6)^alpha; 0 ranks by log-probability alone.")]
MaxLenA = Annotated[float, typer.Option("--max-len-a", help="Output limit: a * source length + b.")]
MaxLenB = Annotated[int, typer.Option("--max-len-b", help="Output limit: a * source length + b.")]
BatchTokens = Annotated[int, typer.Option(help="Source tokens per batch.")]
BatchSize = Annotated[int, typer.Option(help="Sentences per batch (0: limited by tokens only).")]
Checkpoint = Annotated[Path | None, typer.Option(
    help="Checkpoint to use instead of the run's best.pt.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Precision = Annotated[str, typer.Option(
    help="Weights' precision for decoding: fp32, bf16, or auto (bf16 where the GPU or CPU "
    "computes it natively, e.g. CPUs with AMX or AVX512-BF16; else fp32). With --engine "
    "ctranslate2 also int8; auto keeps the export's type.")]
Sample = Annotated[str | None, typer.Option(
    help="Sample instead of searching: topk:K or topp:P.")]
Seed = Annotated[int, typer.Option(help="Random seed for --sample.")]


def _decode_options(beam, nbest, lenpen, max_len_a, max_len_b, batch_tokens, batch_size,
                    sample, seed):
    from traduire.translate import DecodeOptions

    return DecodeOptions(beam=beam, nbest=nbest, lenpen=lenpen, max_len_a=max_len_a,
                         max_len_b=max_len_b, batch_tokens=batch_tokens, batch_size=batch_size,
                         sample=sample, seed=seed)


def _load_translator(run_dir, checkpoint, device, precision, engine, engine_dir):
    from traduire.translate import Translator

    if engine_dir is not None and engine != "ctranslate2":
        raise TraduireError("--engine-dir needs --engine ctranslate2")
    if engine == "torch":
        return Translator.load(run_dir, checkpoint, device, precision)
    if engine != "ctranslate2":
        raise TraduireError(f"--engine {engine!r}: expected torch or ctranslate2")
    from traduire.export import CTranslate2Translator

    if checkpoint is not None:
        raise TraduireError("--checkpoint does not apply to --engine ctranslate2: export that "
                            "checkpoint with 'traduire export --checkpoint FILE'")
    from traduire.train import resolve_device

    return CTranslate2Translator.open(run_dir, engine_dir, device=resolve_device(device).type,
                                      precision=precision)


@command
def translate(
    input: Annotated[str, typer.Argument(help="Text file, one sentence per line; '-' for stdin.")],
    run_dir: RunDir,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output file (default: stdout).")] = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    precision: Precision = "auto",
    engine: Annotated[str, typer.Option(
        help="torch, or ctranslate2 to search with the C++ engine on the model written by "
        "'traduire export' (its length penalty is CTranslate2's: logprob / length^lenpen).")]
        = "torch",
    engine_dir: Annotated[Path | None, typer.Option(
        help="With --engine ctranslate2: the exported model (default: RUN/ctranslate2).")]
        = None,
    beam: Beam = 5,
    nbest: Nbest = 1,
    lenpen: Lenpen = 1.0,
    max_len_a: MaxLenA = 1.2,
    max_len_b: MaxLenB = 10,
    batch_tokens: BatchTokens = 4000,
    batch_size: BatchSize = 0,
    sample: Sample = None,
    seed: Seed = 0,
    format: Annotated[str, typer.Option(
        "--format", "-f", help="text (best translation per line; with --nbest, the n-best "
        "separated by ' ||| ') or jsonl (source, n-best, scores, probabilities).")] = "text",
    show_probs: Annotated[bool, typer.Option(
        "--show-probs", help="Print a table of candidates and their probabilities on stderr.")]
        = False,
    flag_below: Annotated[float | None, typer.Option(
        "--flag-below", help="Warn on stderr about lines whose mean token log-probability is "
        "below this (a sign of a hallucinated or failed translation).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Translate a text file: exactly one output line per input line, in input order."""
    from traduire.translate import translate_file

    if format not in ("text", "jsonl"):
        raise TraduireError(f"--format {format!r}: expected text or jsonl")
    options = _decode_options(beam, nbest, lenpen, max_len_a, max_len_b, batch_tokens,
                              batch_size, sample, seed)
    translator = _load_translator(run_dir, checkpoint, device, precision, engine, engine_dir)
    stats = translate_file(translator, input, output, options, format=format,
                           show_probs=show_probs, progress=not quiet, flag_below=flag_below)
    stderr.print(f"translated {stats['sentences']:,} lines in {stats['seconds']:.1f}s "
                 f"({stats['sentences_per_s']:.1f} sentences/s, "
                 f"{stats['tokens_per_s']:.0f} tokens/s)")


@command
def eval(
    ref: Annotated[Path, typer.Option("--ref", help="Reference translations, one per line.")],
    hyp: Annotated[Path | None, typer.Option(
        "--hyp", help="Translations to score (or give --run-dir and --src to translate).")]
        = None,
    src: Annotated[Path | None, typer.Option("--src", help="Source text to translate.")]
        = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", "-r")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also save the translations here (with --src).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ter: Annotated[bool, typer.Option("--ter", help="Also compute TER.")] = False,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    precision: Precision = "auto",
    beam: Beam = 5,
    lenpen: Lenpen = 1.0,
    max_len_a: MaxLenA = 1.2,
    max_len_b: MaxLenB = 10,
    batch_tokens: BatchTokens = 4000,
    batch_size: BatchSize = 0,
) -> None:
    """Score translations with sacreBLEU (BLEU, chrF): an existing --hyp file, or translate
    --src with a run first."""
    import json

    from traduire.evaluate import check_aligned, read_text, score
    from traduire.translate import Translator, translate_file

    references = read_text(ref)
    speed = None
    if hyp is not None:
        hypotheses = read_text(hyp)
        check_aligned(hyp, hypotheses, ref, references)
    elif src is not None and run_dir is not None:
        sources = read_text(src)
        check_aligned(src, sources, ref, references)
        options = _decode_options(beam, 1, lenpen, max_len_a, max_len_b, batch_tokens,
                                  batch_size, None, 0)
        translator = Translator.load(run_dir, checkpoint, device, precision)
        hypotheses = []
        speed = translate_file(translator, str(src), output, options, collect=hypotheses,
                               progress=not json_)
    else:
        raise TraduireError("give --hyp FILE, or --run-dir DIR with --src FILE")
    result = score(hypotheses, references, ter=ter)
    if speed is not None:
        result["speed"] = speed
    if json_:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(result["bleu_detail"].replace("BLEU", "BLEU", 1))
    print(f"chrF2 = {result['chrf']:.2f}")
    if ter:
        print(f"TER = {result['ter']:.2f}")
    for name, signature in result["signature"].items():
        print(f"{name} signature: {signature}")
    if speed is not None:
        print(f"decoding: {speed['sentences_per_s']:.1f} sentences/s, "
              f"{speed['tokens_per_s']:.0f} target tokens/s ({speed['seconds']:.1f}s)")


@command
def average(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the average.")],
    last: Annotated[int, typer.Option(help="Average the newest N periodic checkpoints.")] = 5,
) -> None:
    """Average the weights of the last N checkpoints (usually a little better than any one)."""
    from traduire.checkpoint import average_checkpoints, save_checkpoint, step_checkpoints

    paths = step_checkpoints(run_dir / "checkpoints")[-last:]
    if len(paths) < 1:
        raise TraduireError(f"{run_dir / 'checkpoints'}: no checkpoints to average")
    state = average_checkpoints(paths)
    state.pop("format_version", None)
    save_checkpoint(output, state)
    stderr.print(f"averaged {len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name}) "
                 f"into {output}")


@command
def export(
    run_dir: RunDir,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Model directory to write (default: RUN/ctranslate2, where "
        "translate --engine ctranslate2 looks).")] = None,
    checkpoint: Checkpoint = None,
    quantization: Annotated[str | None, typer.Option(
        help="Store the weights as float32 (default), bfloat16, float16, int8, int8_float32 "
        "or int8_bfloat16.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")]
        = False,
) -> None:
    """Export the model to CTranslate2, a C++ inference engine (needs the ctranslate2 package:
    pip install 'traduire[ctranslate2]'); then translate with --engine ctranslate2."""
    from traduire.export import export_ctranslate2
    from traduire.translate import Translator

    translator = Translator.load(run_dir, checkpoint, "cpu", "fp32")
    out = export_ctranslate2(translator, output or run_dir / "ctranslate2", quantization, force)
    stderr.print(f"wrote the CTranslate2 model of {translator.checkpoint} to {out}")



# --- looking inside a model ---------------------------------------------------------------------


@command
def attention(
    sentence: Annotated[str, typer.Argument(help="The source sentence.")],
    run_dir: RunDir,
    token: Annotated[str | None, typer.Option(
        "--token", "-t", help="The source word to show (first match; case and punctuation "
        "ignored).")] = None,
    index: Annotated[int | None, typer.Option(
        "--index", "-i", help="The source word to show, by position (0-based).")] = None,
    cross: Annotated[bool, typer.Option(
        "--cross", help="Show the decoder's cross-attention from each word of the model's own "
        "translation to the source words (a soft alignment).")] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw heatmaps to this PNG (needs matplotlib: the 'plot' "
        "extra of traduire).")] = None,
    panels: Annotated[str, typer.Option(
        help="--plot panels: layers (each averaged over its heads) or heads (of --layer).")]
        = "layers",
    layer: Annotated[int, typer.Option(help="Layer (1-based) for --panels heads; "
                                       "default the last.")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    beam: Beam = 5,
) -> None:
    """Show which source words a word attends to (encoder self-attention), per layer and head
    and averaged.

    Words are the sentence's whitespace-separated words (SentencePiece pieces starting with
    "▁" begin a word; punctuation attached to a word stays with it), plus `</s>`, the end
    token. Pieces are merged into words: attention TO a word is the sum over its pieces,
    attention FROM a word is the mean over its pieces, so each row still sums to 1.
    """
    import json

    from rich.console import Console

    from traduire.inspect_model import (
        attention_map,
        cross_table,
        find_word,
        head_lines,
        plot_attention,
        word_table,
    )
    from traduire.translate import Translator

    if token is not None and index is not None:
        raise TraduireError("give --token or --index, not both")
    if cross and (token is not None or index is not None):
        raise TraduireError("--cross shows every output word; drop --token/--index")
    if panels not in ("layers", "heads"):
        raise TraduireError(f"--panels {panels!r}: expected layers or heads")
    translator = Translator.load(run_dir, checkpoint, device, "fp32")
    amap = attention_map(translator, sentence, cross=cross, beam=beam)
    row = None
    if not cross:
        if token is None and index is None:
            if plot is None:
                raise TraduireError("give --token WORD or --index N; words: " + " ".join(
                    f"{i}:{w}" for i, w in enumerate(amap.rows)))
        else:
            row = find_word(amap.rows, token, index)
    if plot is not None:
        plot_attention(amap, plot, panels, layer - 1 if layer else -1)
        stderr.print(f"wrote {plot}")
    if json_:
        record = {"sentence": sentence, "kind": amap.kind, "words": amap.cols}
        if cross:
            record["translation"] = amap.translation
            record["output_words"] = amap.rows
            record["alignment"] = [amap.row_record(r) for r in range(len(amap.rows))]
        elif row is not None:
            record.update(amap.row_record(row))
        print(json.dumps(record, ensure_ascii=False))
        return
    out = Console(soft_wrap=True)
    if cross:
        out.print(f"translation: {amap.translation}", highlight=False)
        out.print(cross_table(amap))
    elif row is not None:
        out.print(word_table(amap, row))
        for line in head_lines(amap, row):
            out.print(line, highlight=False)


@command
def score(
    run_dir: RunDir,
    src: Annotated[Path, typer.Option("--src", help="Source sentences, one per line.")],
    tgt: Annotated[Path, typer.Option("--tgt", help="Target sentences to score, aligned with "
                                      "--src.")],
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
) -> None:
    """Forced decoding: how probable the model finds each target line as a translation of its
    source line (total and per-token log-probability, perplexity, probability)."""
    import json

    from traduire.evaluate import read_text
    from traduire.inspect_model import score_lines, score_pairs
    from traduire.translate import Translator

    sources, targets = read_text(src), read_text(tgt)
    if len(sources) != len(targets):
        raise TraduireError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}")
    translator = Translator.load(run_dir, checkpoint, device, "fp32")
    pairs = score_pairs(translator, sources, targets)
    if json_:
        print(json.dumps({"pairs": [p.as_record() for p in pairs]}, ensure_ascii=False))
        return
    for number, pair in enumerate(pairs, 1):
        print("\n".join(score_lines(number, pair)))


@command
def info(
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", "-r", help="Run directory: its config, vocabulary, newest checkpoint "
        "and data report.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config (no run needed: the vocabulary size is "
        "tokenizer.vocab_size).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set model.preset=big.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Model size by component (embeddings, encoder, decoder), vocabulary, training state and
    data sizes."""
    import json

    from traduire.config import load_config
    from traduire.inspect_model import info_lines, model_info

    if config is None and run_dir is not None and set_:
        config = run_dir / "config.yaml"
    cfg = load_config(config, set_ or []) if config is not None else None
    result = model_info(cfg, run_dir)
    if json_:
        print(json.dumps(result.as_record(), ensure_ascii=False, default=str))
        return
    print("\n".join(info_lines(result)))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    app()
