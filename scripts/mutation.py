"""Mutation testing of one module against its own test file, with mutmut (from PyPI).

    pip install mutmut==3.8.1
    python scripts/mutation.py search     # src/traduire/search.py against tests/test_search.py
    python scripts/mutation.py batch --workers 2 --out mutation-batch.md

For each small change mutmut makes to the module (a mutant: `<` for `<=`, a constant off by
one, an argument dropped), the test file runs; a mutant that no test notices "survives" and
points at behaviour the tests do not pin down. The score is killed / (mutants that some test
runs). The report lists every survivor with its diff.

The run happens in a scratch copy of the project (the project itself is never touched), where
the script does two things mutmut needs:
- mutmut 3 leaves decorated functions alone, which would hide beam search and sampling
  (`@torch.inference_mode()`). In the copy, each decorated module-level function becomes the
  plain function followed by `name = decorator(name)`, which Python defines as the same thing;
  line numbers do not move.
- it appends a [tool.mutmut] section that mutates only this module and runs only its tests.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {".git", ".venv", "runs", "mutants", "__pycache__", ".pytest_cache", ".hypothesis",
           ".ruff_cache"}


def copy_project(target: Path) -> None:
    """The project's sources, tests, configs and docs, without run outputs or caches."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIPPED or n.endswith(".egg-info")}

    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)


def move_decorators_out(path: Path) -> list[str]:
    """Rewrite each decorated module-level function of `path` as the undecorated function
    followed by `f = dec1(dec2(f))`; returns the names. Decorator lines become blank lines,
    and the assignment goes on the blank line after the function (or at the end of the file),
    so every other line keeps its number."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tail: list[str] = []
    names = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or \
                not node.decorator_list:
            continue
        wrapped = node.name
        for decorator in reversed(node.decorator_list):
            wrapped = f"{ast.get_source_segment(source, decorator)}({wrapped})"
        for number in range(node.decorator_list[0].lineno, node.lineno):
            lines[number - 1] = "\n"
        assignment = f"{node.name} = {wrapped}\n"
        after = node.end_lineno  # index of the line after the function
        if after < len(lines) and not lines[after].strip():
            lines[after] = assignment
        else:
            tail.append(assignment)
        names.append(node.name)
    path.write_text("".join(lines + (["\n"] if tail else []) + tail), encoding="utf-8")
    return names


def configure(project: Path, module: str, tests: str) -> None:
    with open(project / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write(f"""
[tool.mutmut]
source_paths = ["src"]
only_mutate = ["{module}"]
pytest_add_cli_args_test_selection = ["{tests}"]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
also_copy = ["tests", "configs", "scripts", "README.md"]
mutate_only_covered_lines = false
""")


def results(project: Path, mutmut: list[str]) -> dict[str, str]:
    """mutant name -> status (killed, survived, no tests, timeout, ...)."""
    out = subprocess.run([*mutmut, "results", "--all", "true"], cwd=project, text=True,
                         capture_output=True, check=True).stdout
    found = (re.fullmatch(r"\s*(\S+): (.+?)\s*", line) for line in out.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def show(project: Path, names: list[str]) -> dict[str, str]:
    """mutant name -> its diff, as `mutmut show NAME` prints it (in one process: starting
    mutmut once per mutant costs a second each)."""
    code = "import sys\nfrom mutmut.__main__ import show\nfor n in sys.argv[1:]: show.callback(n)"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=project, text=True,
                         capture_output=True, check=True).stdout
    diffs: dict[str, str] = {}
    for chunk in re.split(r"^# (?=\S+: )", out, flags=re.M)[1:]:
        header, _, diff = chunk.partition("\n")
        diffs[header.split(":")[0]] = diff
    return diffs


def function_of(mutant: str) -> str:
    """traduire.search.x_beam_search__mutmut_12 -> beam_search;
    traduire.batch.xǁBatchǁto__mutmut_3 -> Batch.to"""
    name = mutant.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    if name.startswith("xǁ"):
        return ".".join(name[2:].split("ǁ"))
    return name[2:]


def report(statuses: dict[str, str], module: str, tests: str, diffs: dict[str, str],
           seconds: float) -> str:
    counts = Counter(statuses.values())
    tested = len(statuses) - counts["no tests"]
    killed = counts["killed"] + counts["timeout"]
    lines = [f"# Mutation testing: {module} against {tests}", "",
             f"{len(statuses)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.most_common())
             + f"; mutmut ran {seconds:.0f} s", "",
             f"score = killed / tested = {killed}/{tested} = "
             f"{100 * killed / max(tested, 1):.1f} % (a timeout counts as killed)", "",
             "| function | mutants | killed | survived | no tests |",
             "| --- | --- | --- | --- | --- |"]
    per_function: dict[str, Counter] = {}
    for name, status in statuses.items():
        per_function.setdefault(function_of(name), Counter())[status] += 1
    for function, c in sorted(per_function.items()):
        lines.append(f"| {function} | {sum(c.values())} | {c['killed'] + c['timeout']} | "
                     f"{c['survived']} | {c['no tests']} |")
    lines += ["", "## Mutants not killed", ""]
    for name, status in statuses.items():
        if status not in ("killed", "timeout"):
            lines += [f"### {name} ({status})", "", "```diff", diffs.get(name, "").strip(),
                      "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a module name (search) or path (src/traduire/search.py)")
    parser.add_argument("tests", nargs="?", help="its test file (default tests/test_NAME.py)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="mutants tested at once (default: one per CPU)")
    parser.add_argument("--out", type=Path, help="write the report here (default: stdout)")
    parser.add_argument("--keep", type=Path,
                        help="do the run in this directory and keep it (default: a temporary "
                             "one, removed at the end); `mutmut show NAME` works there")
    args = parser.parse_args(argv)
    module = args.module if args.module.endswith(".py") else f"src/traduire/{args.module}.py"
    tests = args.tests or f"tests/test_{Path(module).stem}.py"
    for path in (module, tests):
        if not (ROOT / path).is_file():
            parser.error(f"{ROOT / path}: no such file")
    mutmut = [sys.executable, "-m", "mutmut"]
    if subprocess.run([*mutmut, "--version"], capture_output=True).returncode != 0:
        parser.error("mutmut is not installed here: pip install mutmut==3.8.1")

    scratch = args.keep or Path(tempfile.mkdtemp(prefix="traduire-mutation-"))
    if args.keep and scratch.exists():
        shutil.rmtree(scratch)
    try:
        copy_project(scratch)
        undecorated = move_decorators_out(scratch / module)
        if undecorated:
            print(f"decorators moved out of: {', '.join(undecorated)}", file=sys.stderr)
        configure(scratch, module, tests)
        # One thread per worker: the workers share the CPUs.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.monotonic()
        run = subprocess.run([*mutmut, "run", "--max-children", str(args.workers)],
                             cwd=scratch, env=env, stdout=subprocess.DEVNULL)
        seconds = time.monotonic() - start
        if run.returncode != 0:
            print(f"mutmut run failed (exit {run.returncode}); rerun with --keep DIR and look "
                  "in DIR", file=sys.stderr)
            return 1
        statuses = results(scratch, mutmut)
        diffs = show(scratch, [name for name, status in statuses.items()
                               if status not in ("killed", "timeout")])
        text = report(statuses, module, tests, diffs, seconds)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
