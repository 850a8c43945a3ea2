"""The documentation's promises: the README's layer snippet runs as written, its first commands
are the project's two set-up commands, and every recipe, flag, override key and relative link
that README.md and docs/ name exists, anchors included."""
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = sorted((REPO / "docs").glob("*.md"))
# Every page whose commands and links are checked.
PAGES = [REPO / "README.md", *DOCS, REPO / "results" / "cpu" / "README.md",
         REPO / "results" / "ptb" / "README.md", REPO / "data" / "README.md"]


def text(page):
    return page.read_text(encoding="utf-8")


def rel(page):
    return str(page.relative_to(REPO))


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_layer_snippet_runs_as_written(tmp_path):
    (snippet,) = [b for b in python_blocks() if "from flipout_lstm.nn import LSTM" in b]
    # As a user would run it: a fresh interpreter, outside the repository, the package importable.
    # PATH, HOME and TORCH_EXTENSIONS_DIR as the user's, so the compiled cell is the one torch
    # built already: under another PATH ninja sees another compiler and builds it again (about a
    # minute), and the next process with the user's PATH builds it back.
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update({k: os.environ[k] for k in ("PATH", "HOME", "TORCH_EXTENSIONS_DIR") if k in os.environ})
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr


def test_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert len(first_block) == 2, first_block
    assert first_block[0].startswith("pip install -r requirements.txt && python train.py recipes/char_ptb.yaml")
    assert first_block[1].startswith("pip install -r requirements.txt && python -m pytest -q")
    # CI installs the same requirements and ends with exactly the README's test command.
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert "pip install -q -r requirements.txt" in ci
    assert ci[-1] == "python -m pytest -q" == first_block[1].split("&&")[1].split("#")[0].strip()


def test_readme_is_a_short_front_door():
    assert len(README.splitlines()) <= 260


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_recipes_named_exist(page):
    body = text(page)
    for path in set(re.findall(r"recipes/[\w/]+\.yaml", body)) - {"recipes/nope.yaml"}:
        assert (REPO / path).is_file(), f"{rel(page)} names {path}, which does not exist"
    for pattern in set(re.findall(r"recipes/[\w/]*\*\.yaml", body)):
        assert glob.glob(str(REPO / pattern)), f"{rel(page)}: {pattern} matches no recipe"


def without_code_blocks(body):
    return re.sub(r"```.*?```", "", body, flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_to_existing_files(page):
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code_blocks(text(page))):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, or an anchor on the same page
        path = target.split("#")[0]
        assert (page.parent / path).exists(), f"{rel(page)} links to {target}, which does not exist"


# ------------------------------------------------------------------ commands, as written

# The programs the documentation runs, as they appear on a command line, and how to ask for help.
TOOLS = {
    "train.py": ["train.py"], "evaluate.py": ["evaluate.py"], "grad_variance.py": ["grad_variance.py"],
    "benchmarks/lstm_speed.py": ["benchmarks/lstm_speed.py"],
    "benchmarks/train_step.py": ["benchmarks/train_step.py"],
    "benchmarks/encode_speed.py": ["benchmarks/encode_speed.py"],
    "flipout_lstm.sample": ["-m", "flipout_lstm.sample"], "flipout_lstm.sweep": ["-m", "flipout_lstm.sweep"], "flipout_lstm.report": ["-m", "flipout_lstm.report"],
}
OVERRIDES = {"train.py", "flipout_lstm.sweep"}  # tools that take key.path=value recipe overrides


def commands(body):
    """Every command line of the page's bash blocks (continuations joined, comments dropped)
    and every inline `python ...` span."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if line:
                lines.append(line)
    for span in re.findall(r"`([^`]+)`", without_code_blocks(body)):
        if span.startswith(("python ", "torchrun ")):
            lines.append(" ".join(span.split()))
    return lines


def invocations(body):
    """``(tool, arguments after it)`` for every documented run of one of TOOLS."""
    for line in commands(body):
        for part in re.split(r"&&|\|", line):
            words = shlex.split(part)
            for i, word in enumerate(words):
                if word in TOOLS and (word.endswith(".py") or words[i - 1] == "-m"):
                    yield word, words[i + 1:]
                    break


@functools.lru_cache(maxsize=None)
def help_text(tool):
    """``python <tool> --help`` as the documentation runs it, in this process: the script run
    as ``__main__`` (a ``-m`` module's ``main``) with that argv, its stdout captured, exit
    status 0. The same parser prints the same help as in a child process, without an
    interpreter's and torch's start (seconds a tool)."""
    import contextlib
    import importlib
    import io
    import runpy

    command = TOOLS[tool]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path, cwd = sys.argv, list(sys.path), os.getcwd()
    os.chdir(REPO)
    try:
        # sys.path[0] and sys.argv as `python -m module` (the working directory, the module's
        # file) and `python script` (the script's folder, the script) set them.
        script = None if command[0] == "-m" else REPO / command[0]
        sys.path.insert(0, str(script.parent if script else REPO))
        module = None if script else importlib.import_module(command[1])
        target = str(script) if script else module.__file__
        sys.argv = [target, "--help"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                pytest.raises(SystemExit) as exited:
            if module:  # `if __name__ == "__main__": sys.exit(main())`
                sys.exit(module.main())
            else:
                runpy.run_path(target, run_name="__main__")
    finally:  # nor do its sys.path entries (a benchmark's own insertions) outlive its run
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(cwd)
    assert exited.value.code in (0, None), err.getvalue()
    return out.getvalue()


def config_keys():
    from flipout_lstm.config import Config, _field_paths
    return {path for path, _ in _field_paths(Config)}


def test_the_command_parser_finds_the_documented_commands():
    found = [tool for page in PAGES for tool, _ in invocations(text(page))]
    assert set(found) >= {"train.py", "evaluate.py", "flipout_lstm.sample", "flipout_lstm.sweep", "flipout_lstm.report",
                          "grad_variance.py"}, set(found)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_commands_use_flags_and_keys_that_exist(page):
    keys = config_keys()
    for tool, args in invocations(text(page)):
        for arg in args:
            if arg.startswith("--"):
                flag = arg.split("=")[0]
                assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", help_text(tool)), \
                    f"{rel(page)}: {tool} has no flag {flag}"
            elif tool in OVERRIDES and re.match(r"[a-z_]+(\.[a-z_]+)+=", arg):
                key = arg.split("=")[0]
                assert key in keys, f"{rel(page)}: {tool} {arg}: no config key {key}"


def heading_anchors(body):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped (letters,
    digits, spaces, hyphens and underscores kept), spaces to hyphens, repeats numbered."""
    seen, anchors = {}, set()
    for title in re.findall(r"^#{1,6} +(.+?) *#*$", without_code_blocks(body), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_heading_anchors_follow_github():
    body = "# A: b's `c` (2026-12-04)\n## A: b's `c` (2026-12-04)\n```\n# not a heading\n```\n"
    assert heading_anchors(body) == {"a-bs-c-2026-12-04", "a-bs-c-2026-12-04-1"}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_anchored_links_point_to_existing_headings(page):
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code_blocks(text(page))):
        if re.match(r"[a-z]+:", target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        linked = (page.parent / path) if path else page
        if linked.suffix != ".md" or not linked.is_file():
            continue  # a missing file is test_relative_links_point_to_existing_files' to report
        assert anchor in heading_anchors(text(linked)), (
            f"{rel(page)} links to {target}, but {rel(linked)} has no heading with that anchor")
