"""The `traduire` command line: parse the arguments, call one library function, print.

Errors a user can fix (TraduireError) are printed as one line on stderr with exit status 1;
`--debug` shows the full traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from traduire.errors import TraduireError

app = typer.Typer(
    help="Train Transformer translation models and translate with them.",
    pretty_exceptions_enable=False, add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]})
stderr = Console(stderr=True)
_debug = False


@app.callback(invoke_without_command=True)
def _global(ctx: typer.Context, debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks instead of one-line errors.")] = False) -> None:
    global _debug
    _debug = debug
    if ctx.invoked_subcommand is None:
        # No command: the help, and the exit status of any other usage error (whatever
        # click's version would do with no_args_is_help).
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


def command(fn=None, *, name: str | None = None):
    """Register a subcommand whose user errors end in one line and a non-zero exit (named
    `name`, else after the function)."""
    if fn is None:
        return functools.partial(command, name=name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TraduireError as e:
            if _debug:
                raise
            say(f"[bold red]error:[/] {escape(str(e))}", markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            say("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            from traduire.distributed import failed_elsewhere

            if not _debug and failed_elsewhere(e):
                # This rank only saw a peer vanish; the peer's own error is the one to read.
                say(f"rank {os.environ.get('RANK', 0)}: stopping because another rank failed")
                raise typer.Exit(1) from None
            if not isinstance(e, OSError) or _debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            say(f"[bold red]error:[/] {escape(where + str(e.strerror or e))}", markup=True)
            raise typer.Exit(1) from None

    return app.command(name)(wrapper)


def say(message: str, markup: bool = False) -> None:
    """One line on stderr (markup off: a path may hold '[...]'; soft_wrap: one line, even in
    a log file)."""
    stderr.print(message, markup=markup, highlight=False, soft_wrap=True)


# --- Options shared by several commands -------------------------------------------------------

RunDir = Annotated[Path, typer.Option("--run-dir", "-r", help="Run directory: everything a run "
                                      "makes is written here.")]
ConfigFile = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML config. Optional when resuming: the run directory's "
    "config.yaml is used.")]
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key, e.g. --set model.layers=6 "
    "--set train.max_time=30m. Repeatable.")]
Overwrite = Annotated[bool, typer.Option(
    help="Redo the first stage whose settings changed and every stage after it; old outputs "
    "are moved to RUN_DIR/old/.")]
Checkpoint = Annotated[Path | None, typer.Option(
    help="Checkpoint to use instead of the run's average.pt or best.pt.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Precision = Annotated[str, typer.Option(
    help="Weights' precision for decoding: fp32, bf16, or auto (bf16 where the GPU or CPU "
    "computes it natively, e.g. CPUs with AMX or AVX512-BF16; else fp32). With --engine "
    "ctranslate2 also int8; auto keeps the export's type.")]
Engine = Annotated[str, typer.Option(
    help="torch, or ctranslate2 to search with the C++ engine on the model written by "
    "'traduire export' (its length penalty is CTranslate2's: logprob / length^lenpen).")]
EngineDir = Annotated[Path | None, typer.Option(
    help="With --engine ctranslate2: the exported model (default: RUN/ctranslate2).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

_DECODING = {  # name: (default, type, help); one --option each, for translate and eval
    "beam": (5, int, "Beam size; 1 is greedy search."),
    "nbest": (1, int, "Hypotheses to output per sentence (<= beam)."),
    "lenpen": (1.0, float, "Length penalty exponent alpha of ((5+|y|)/6)^alpha; 0 ranks by "
               "log-probability alone."),
    "max_len_a": (1.2, float, "Output limit: a * source length + b (per sentence)."),
    "max_len_b": (10, int, "Output limit: a * source length + b (per sentence)."),
    "batch_tokens": (4000, int, "Source tokens per batch."),
    "batch_size": (0, int, "Sentences per batch (0: limited by tokens only)."),
    "sample": (None, str | None, "Sample instead of searching: topk:K or topp:P."),
    "seed": (0, int, "Random seed for --sample."),
}


def decoding_options(fn):
    """Give a command the decoding options above; it receives them as `options`."""
    hints = typing.get_type_hints(fn, include_extras=True)  # the annotations, evaluated
    own = [p.replace(annotation=hints[p.name])
           for p in inspect.signature(fn).parameters.values() if p.name != "options"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                               annotation=Annotated[kind, typer.Option(help=text)])
             for name, (default, kind, text) in _DECODING.items()]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any):
        from traduire.translate import DecodeOptions  # not at import: --help stays quick

        values = {name: kwargs.pop(name) for name in _DECODING}
        return fn(**kwargs, options=DecodeOptions(**values))

    wrapper.__signature__ = inspect.Signature(own + added)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    return wrapper


# --- Commands ------------------------------------------------------------------------------------


def _config(run_dir: Path, config: Path | None, overrides: list[str] | None):
    from traduire.config import load_config

    if config is None:
        config = run_dir / "config.yaml"
        if not config.exists():
            raise TraduireError(f"{run_dir} has no config.yaml yet: give --config")
    return load_config(config, overrides or [])


@command
def train(run_dir: RunDir, config: ConfigFile = None, set_: Overrides = None,
          overwrite: Overwrite = False) -> None:
    """Prepare data, train the tokenizer, and train (or resume training) the model."""
    from traduire import distributed, pipeline
    from traduire.training import TrainingInterrupted

    try:
        state = pipeline.train(_config(run_dir, config, set_), run_dir, overwrite=overwrite)
        distributed.shutdown(together=True)
    except TrainingInterrupted as stop:
        again = ("the same torchrun command" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                 else f"traduire train --run-dir {run_dir}")
        say(f"stopped by {stop.signal_name} at step {stop.step}; checkpoint {stop.checkpoint}. "
            f"To resume: {again}")
        raise typer.Exit(128 + signal.Signals[stop.signal_name]) from None
    finally:
        distributed.shutdown()
    say(f"done: step {state.step}, epoch {state.epoch}, best valid loss "
        f"{state.best_valid_loss:.3f}; checkpoints in {run_dir / 'checkpoints'}")


@command
def prepare(run_dir: RunDir, config: ConfigFile = None, set_: Overrides = None,
            overwrite: Overwrite = False) -> None:
    """Prepare a run without training: load and clean the corpus, train SentencePiece, and
    encode both splits (the data and tokenizer stages that train runs first).

    Run it once, on one machine, before launching many GPUs on a large corpus; `traduire
    train --run-dir RUN_DIR` (under torchrun or not) then finds both stages done and starts
    training at once.

    Stages already done with the same settings are skipped. If a setting they depend on
    changed, prepare stops and names it; --overwrite redoes that stage and those after it.
    Cleaning and encoding use data.workers processes (0, the default: every core this process
    may use); the results are the same for any number. What cleaning dropped, and why, is
    counted in RUN_DIR/data/report.json."""
    from traduire import pipeline

    pipeline.prepare(_config(run_dir, config, set_), run_dir, overwrite=overwrite)
    say(f"prepared: {run_dir}; train with: traduire train --run-dir {run_dir}")


@command
@decoding_options
def translate(
    input: Annotated[str, typer.Argument(help="Text file, one sentence per line; '-' for stdin.")],
    run_dir: RunDir,
    options: Any,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output file (default: stdout).")] = None,
    checkpoint: Checkpoint = None, device: Device = "auto", precision: Precision = "auto",
    engine: Engine = "torch", engine_dir: EngineDir = None,
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
    workers: Annotated[int, typer.Option(
        help="Translate on this many processes (CPU), the threads split among them; the "
        "output is the same for any number. Under torchrun, one process per rank instead "
        "(a GPU each where there are GPUs).")] = 1,
    threads: Annotated[int, typer.Option(
        help="Threads per process (0: this machine's threads divided among the workers).")]
        = 0,
    chunk_lines: Annotated[int, typer.Option(
        help="Lines per chunk: what a process translates at a time, sorted by length "
        "together, and the unit of progress a rerun continues from.")] = 10_000,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start again, whatever unfinished translation to --output is "
        "there (a rerun of the same command continues it instead).")] = False,
) -> None:
    """Translate a text file: exactly one output line per input line, in input order. A
    translation to a file keeps its progress beside it (OUTPUT.parts/): the same command run
    again after an interruption continues where it stopped."""
    import dataclasses
    import functools

    from traduire.translate import load_translator
    from traduire.translate_chunks import torchrun_rank
    from traduire.translate_files import translate_file

    launch = torchrun_rank()
    if launch is not None and device == "auto":
        import torch

        if torch.cuda.is_available():  # one device per process
            device = f"cuda:{launch[2] % torch.cuda.device_count()}"
    if launch is not None:
        from traduire import distributed

        distributed.init("cuda" if device.startswith("cuda") else "cpu")
    if threads:
        import torch

        torch.set_num_threads(threads)
    load = functools.partial(load_translator, run_dir, engine, engine_dir, checkpoint, device,
                             precision)
    translator = load()
    options = dataclasses.replace(options, chunk_lines=chunk_lines)
    stats = translate_file(translator, input, output, options, format=format,
                           show_probs=show_probs, progress=not quiet, flag_below=flag_below,
                           workers=workers, load=load, threads=threads, overwrite=overwrite,
                           rank=launch[:2] if launch is not None else None)
    if stats.get("rank", 0) == 0:
        say(f"translated {stats['sentences']:,} lines in {stats['seconds']:.1f}s "
            f"({stats['sentences_per_s']:.1f} sentences/s, "
            f"{stats['tokens_per_s']:.0f} tokens/s)")


@command
@decoding_options
def eval(
    ref: Annotated[Path, typer.Option("--ref", help="Reference translations, one per line.")],
    options: Any,
    hyp: Annotated[Path | None, typer.Option(
        "--hyp", help="Translations to score (or give --run-dir and --src to translate).")]
        = None,
    src: Annotated[Path | None, typer.Option("--src", help="Source text to translate.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", "-r")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also save the translations here (with --src).")] = None,
    json_: Json = False,
    ter: Annotated[bool, typer.Option("--ter", help="Also compute TER.")] = False,
    checkpoint: Checkpoint = None, device: Device = "auto", precision: Precision = "auto",
    engine: Engine = "torch", engine_dir: EngineDir = None,
) -> None:
    """Score translations with sacreBLEU (BLEU, chrF): an existing --hyp file, or translate
    --src with a run first."""
    from traduire.evaluate import report_lines, score_files
    from traduire.translate import load_translator
    from traduire.translate_files import translate_and_score

    if hyp is not None:
        result = score_files(hyp, ref, ter)
    elif src is not None and run_dir is not None:
        translator = load_translator(run_dir, engine, engine_dir, checkpoint, device, precision)
        result = translate_and_score(translator, src, ref, options, output, ter,
                                     progress=not json_)
    else:
        raise TraduireError("give --hyp FILE, or --run-dir DIR with --src FILE")
    print(json.dumps(result, ensure_ascii=False) if json_ else "\n".join(report_lines(result)))


@command
def average(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the average.")],
    last: Annotated[int, typer.Option(help="Average the newest N periodic checkpoints.")] = 5,
) -> None:
    """Average the weights of the last N checkpoints (usually a little better than any one)."""
    from traduire.checkpoint import average_last

    paths = average_last(run_dir / "checkpoints", last, output)
    say(f"averaged {len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name}) into "
        f"{output}")


@command
def export(
    run_dir: RunDir,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Model directory to write (default: RUN/ctranslate2, where "
        "translate --engine ctranslate2 looks, or RUN/transformers).")] = None,
    format: Annotated[str, typer.Option(
        "--format", "-f", help="ctranslate2, or transformers: a directory Hugging Face "
        "transformers loads (AutoModelForSeq2SeqLM, AutoTokenizer), to publish on the hub.")]
        = "ctranslate2",
    checkpoint: Checkpoint = None,
    quantization: Annotated[str | None, typer.Option(
        help="CTranslate2: store the weights as float32 (default), bfloat16, float16, int8, "
        "int8_float32 or int8_bfloat16.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
) -> None:
    """Export the model to CTranslate2, a C++ inference engine (needs the ctranslate2 package:
    pip install 'traduire[ctranslate2]'; then translate with --engine ctranslate2), or to
    Hugging Face transformers (--format transformers; needs pip install 'traduire[hf]'):
    post-norm models as MarianMTModel, pre-norm ones as PegasusForConditionalGeneration,
    each with a MarianTokenizer, weights in safetensors."""
    from traduire.translate import Translator

    if format not in ("ctranslate2", "transformers"):
        raise TraduireError(f"--format {format!r}: expected ctranslate2 or transformers")
    if format == "transformers" and quantization is not None:
        raise TraduireError("--quantization is for --format ctranslate2; transformers models "
                            "are written in float32")
    translator = Translator.load(run_dir, checkpoint, "cpu", "fp32")
    if format == "transformers":
        from traduire.huggingface import export_transformers

        out = export_transformers(translator, output or run_dir / "transformers", force=force)
        say(f"wrote the transformers model of {translator.checkpoint} to {out}")
        return
    from traduire.export import export_ctranslate2

    out = export_ctranslate2(translator, output or run_dir / "ctranslate2", quantization, force)
    say(f"wrote the CTranslate2 model of {translator.checkpoint} to {out}")


@command(name="import")
def import_(
    source: Annotated[Path, typer.Argument(
        help="A transformers model directory (what save_pretrained writes), e.g. an OPUS-MT "
        "model downloaded with huggingface-cli download Helsinki-NLP/opus-mt-en-fr "
        "--local-dir DIR.")],
    run_dir: RunDir,
) -> None:
    """Make a run directory of a Hugging Face Marian model (the OPUS-MT family) or of a
    model traduire exported: translate, eval, score, attention, info and export work on it,
    and train.init_from fine-tunes it on your data. Nothing is downloaded; needs
    pip install 'traduire[hf]'."""
    from traduire.huggingface import import_model

    out = import_model(source, run_dir)
    say(f"imported {source} into {out}; translate with: traduire translate --run-dir {out}")


# --- Looking inside a model ----------------------------------------------------------------------


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
    json_: Json = False, checkpoint: Checkpoint = None, device: Device = "auto",
    beam: Annotated[int, typer.Option(help="Beam size of the translation for --cross.")] = 5,
) -> None:
    """Show which source words a word attends to (encoder self-attention), per layer and head
    and averaged.

    Words are the sentence's whitespace-separated words (SentencePiece pieces starting with
    "▁" begin a word; punctuation attached to a word stays with it), plus `</s>`, the end
    token. Pieces are merged into words: attention TO a word is the sum over its pieces,
    attention FROM a word is the mean over its pieces, so each row still sums to 1.
    """
    from traduire import report
    from traduire.translate import Translator

    translator = Translator.load(run_dir, checkpoint, device, "fp32")
    amap, row = report.attention_view(translator, sentence, token, index, cross, beam,
                                      need_word=plot is None)
    if plot is not None:
        report.plot_attention(amap, plot, panels, layer - 1 if layer else -1)
        say(f"wrote {plot}")
    if json_:
        print(json.dumps(report.attention_record(amap, sentence, row), ensure_ascii=False))
        return
    out = Console(soft_wrap=True)
    for item in report.attention_text(amap, row):
        out.print(item, highlight=False)


@command
def score(
    run_dir: RunDir,
    src: Annotated[Path, typer.Option("--src", help="Source sentences, one per line.")],
    tgt: Annotated[Path, typer.Option("--tgt", help="Target sentences to score, aligned with "
                                      "--src.")],
    json_: Json = False, checkpoint: Checkpoint = None, device: Device = "auto",
) -> None:
    """Forced decoding: how probable the model finds each target line as a translation of its
    source line (total and per-token log-probability, perplexity, probability)."""
    from traduire import report
    from traduire.translate import Translator

    translator = Translator.load(run_dir, checkpoint, device, "fp32")
    pairs = report.score_files(translator, src, tgt)
    if json_:
        print(json.dumps({"pairs": [p.as_record() for p in pairs]}, ensure_ascii=False))
        return
    for number, pair in enumerate(pairs, 1):
        print("\n".join(report.score_lines(number, pair)))


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
    json_: Json = False,
) -> None:
    """Model size by component (embeddings, encoder, decoder), vocabulary, training state and
    data sizes."""
    from traduire import report

    result = report.model_info(config, run_dir, set_ or [])
    print(report.info_json(result) if json_ else "\n".join(report.info_lines(result)))


def main() -> None:
    """The `traduire` executable: the runtime settings for speed, then the command."""
    from traduire.runtime import configure_runtime

    configure_runtime()
    app(prog_name="traduire")


if __name__ == "__main__":
    sys.exit(main())
