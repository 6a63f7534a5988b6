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

from traduire.errors import TraduireError

app = typer.Typer(
    help="Train Transformer translation models and translate with them.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
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
            stderr.print(f"[bold red]error:[/] {e}", highlight=False, markup=True,
                         soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None
        except OSError as e:  # disk full, permissions, a directory where a file should be
            if _debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            stderr.print(f"[bold red]error:[/] {where}{e.strerror or e}", highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None

    return app.command()(wrapper)


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
    cfg = load_config(config, set_ or [])
    state = run(cfg, run_dir, overwrite=overwrite)
    stderr.print(f"done: step {state.step}, epoch {state.epoch}, best valid loss "
                 f"{state.best_valid_loss:.3f}; checkpoints in {run_dir / 'checkpoints'}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    app()
