"""Run every code block of README.md in order, in one process, and report each block's outcome as JSON.

Used by ``tests/test_readme.py`` (run as ``python tests/readme_runner.py README.md WORKDIR TINY_DIR RESULT.json``).
Blocks run in README order in WORKDIR, so a file one block writes (``corpus.txt``, ``my-gpt2``) is there for the
next. Python blocks run with ``exec`` (a fresh namespace, or the previous Python block's after a
``<!-- readme-test: continue -->`` marker); shell blocks run line by line: ``gpt2-jax ...`` through
``gpt2_jax.cli.main`` in this process (one JAX import for the whole README), ``python -c CODE`` with ``exec``;
``pip``, ``pytest`` and ``python benchmarks/...`` are skipped (installs, the test suite, minutes-long benchmarks).

Substitutions keep it offline and bounded (a few minutes in all):

* every ``gpt2-jax`` command gets the tiny local checkpoint TINY_DIR (random weights, GPT-2's tokenizer) for a
  ``--model`` / ``--weights`` / convert ``SRC`` that is not an existing local path (hub ids, placeholders), and
  capped sizes (``--steps 3``, ``--max-new-tokens 8``, ``--batch 1``, ...);
* in blocks marked ``<!-- readme-test: hub -->``, ``from_pretrained("...")`` reads TINY_DIR;
* in Python blocks, ``range(N)`` loops of 10 or more iterations run 3, and ``GPT2Config.from_preset("gpt2")`` has
  2 blocks (gpt2's widths and vocabulary, a sixth of its depth).

Markers (an HTML comment on the line before the fence): ``hub`` (needs the hub as written: substituted),
``continue`` (Python: the previous block's namespace), ``skip: REASON``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def parse_blocks(text: str) -> list[dict]:
    """The README's ``python`` and ``bash`` blocks: ``{index, lang, line, code, markers, skip}``."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        lang, start = match.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        markers, skip = set(), None
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        while k >= 0 and MARKER.search(lines[k]):
            for item in MARKER.search(lines[k]).group(1).split(","):
                item = item.strip()
                if item.startswith("skip"):
                    skip = item.partition(":")[2].strip() or "marked skip"
                elif item:
                    markers.add(item)
            k -= 1
        if lang in ("python", "bash", "sh", "shell"):
            blocks.append({"index": len(blocks), "lang": "python" if lang == "python" else "bash",
                           "line": start + 1, "code": "\n".join(lines[start + 1:j]), "markers": sorted(markers),
                           "skip": skip})
        i = j + 1
    return blocks


# ------------------------------------------------------------------------------------------------ python
def python_source(block: dict, tiny_dir: str) -> str:
    code = block["code"]
    if "hub" in block["markers"]:
        code = re.sub(r"from_pretrained\(\s*([\"'])[^\"']*\1", lambda m: f"from_pretrained({tiny_dir!r}", code)
    code = code.replace('GPT2Config.from_preset("gpt2")', 'GPT2Config.from_preset("gpt2", n_layer=2)')  # 2 blocks
    return re.sub(r"\brange\((\d+)\)", lambda m: f"range({min(int(m.group(1)), 3)})" if int(m.group(1)) >= 10
                  else m.group(0), code)


# ------------------------------------------------------------------------------------------------- shell
LOADING = {"generate", "next", "lens", "attention", "eval"}
CAPS = {"--max-new-tokens": 8, "--new": 4, "--prompt": 8, "--steps": 3, "--seq-len": 32, "--stride": 16,
        "--batch-size": 4, "--accum-steps": 2, "--warmup-steps": 1, "--eval-every": 2, "--save-every": 2,
        "--runs": 1, "--top": 10}


def shell_commands(code: str) -> list[str]:
    """Logical lines (``\\`` continuations joined), split at ``&&``."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        current: list[str] = []
        for token in tokens + ["&&"]:
            if token == "&&":
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def _data_file(path: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 40
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": f"{i}: {text}"}) + "\n" for i in range(8)))
    else:
        path.write_text(text * 4)


def substitute(argv: list[str], tiny_dir: str) -> list[str]:
    """The tiny, offline version of a ``gpt2-jax`` command line (see the module docstring)."""
    command, args = argv[0], list(argv[1:])
    out: list[str] = []
    i = 0
    positional = 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if arg == "--revision":
            i += 2
            continue
        if arg in ("--model", "--weights") and value is not None:
            keep = Path(value).exists() or (command == "info" and "--random-weights" in args)
            out += [arg, value if keep else tiny_dir]
            i += 2
            continue
        if arg == "--config-preset" and value is not None:
            out += [arg, "tiny"]
            i += 2
            continue
        if arg == "--batch" and value is not None:
            out += [arg, "1"]
            i += 2
            continue
        if arg in CAPS and value is not None:
            out += [arg, str(min(int(float(value)), CAPS[arg]))]
            i += 2
            continue
        if arg in ("--data", "--eval-data"):
            out.append(arg)
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                if not Path(args[i]).exists():
                    _data_file(Path(args[i]))
                out.append(args[i])
                i += 1
            continue
        if not arg.startswith("-"):
            if command == "convert" and positional == 0 and not Path(arg).exists():
                arg = tiny_dir
            positional += 1
        out.append(arg)
        i += 1
    if command in LOADING and "--model" not in out:
        out += ["--model", tiny_dir]
    if command == "bench":
        out += ["--no-measure-peaks"] if "--print-schema" not in out else []
    return [command, *out]


def run_shell(block: dict, tiny_dir: str, log: list[str]) -> None:
    from gpt2_jax import cli

    for argv in shell_commands(block["code"]):
        env = {}
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        if not argv:
            continue
        if argv[0] in ("pip", "pytest") or (argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py")):
            log.append(f"skipped (install / test suite / benchmark): {shlex.join(argv)}")
            continue
        if argv[0] == "python" and argv[1:2] == ["-c"]:
            exec(compile(argv[2], f"README.md:{block['line']} (python -c)", "exec"), {"__name__": "__main__"})
            continue
        if argv[0] != "gpt2-jax":
            raise RuntimeError(f"the README test does not know how to run {argv[0]!r}")
        argv = substitute(argv[1:], tiny_dir)
        log.append("gpt2-jax " + shlex.join(argv))
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                try:
                    code = cli.main(argv)
                except SystemExit as e:
                    code = e.code
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if code not in (0, None):
            raise RuntimeError(f"`gpt2-jax {shlex.join(argv)}` exited {code}:\n{err.getvalue()[-3000:]}")


def main(readme: str, workdir: str, tiny_dir: str, result_path: str) -> None:
    readme = os.path.abspath(readme)
    tiny_dir = os.path.abspath(tiny_dir)
    result_path = os.path.abspath(result_path)
    os.chdir(workdir)
    os.environ["GPT2_JAX_COMPILATION_CACHE"] = "off"
    os.environ["HF_HUB_OFFLINE"] = "1"
    results = []
    namespace: dict = {}
    # README_TEST_ONLY=FILE (a JSON list of block sources): run only those blocks (to re-check edited sections)
    only = json.loads(Path(os.environ["README_TEST_ONLY"]).read_text()) if os.environ.get("README_TEST_ONLY") else None
    for block in parse_blocks(Path(readme).read_text(encoding="utf-8")):
        if only is not None and block["code"] not in only:
            continue
        record = {"index": block["index"], "line": block["line"], "lang": block["lang"], "status": "ok", "log": []}
        start = time.perf_counter()
        try:
            if block["skip"]:
                record.update(status="skipped", reason=block["skip"])
            elif block["lang"] == "python":
                if "continue" not in block["markers"]:
                    namespace = {"__name__": "__main__"}
                source = python_source(block, tiny_dir)
                exec(compile(source, f"README.md:{block['line']}", "exec"), namespace)
            else:
                run_shell(block, tiny_dir, record["log"])
        except BaseException:  # noqa: BLE001 - every failure is reported, the next block still runs
            record.update(status="failed", error=traceback.format_exc()[-4000:])
        record["seconds"] = round(time.perf_counter() - start, 2)
        results.append(record)
        print(f"README.md:{block['line']} {block['lang']}: {record['status']} ({record['seconds']} s)",
              file=sys.__stderr__, flush=True)
        Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
