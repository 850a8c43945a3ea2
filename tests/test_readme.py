"""The README's promises: its layer snippet runs as written, its commands name real things."""
import re
import subprocess
import sys

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_layer_snippet_runs_as_written(tmp_path):
    (snippet,) = [b for b in python_blocks() if "from lm.nn import LSTM" in b]
    # As a user would run it: a fresh interpreter, outside the repository, the package importable.
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def test_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert first_block[0].startswith("pip install -r requirements.txt && python train.py recipes/char_ptb.yaml")
    assert first_block[1].startswith("pip install -r requirements.txt && python -m pytest -q")
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt && python -m pytest -q" in ci


def test_recipes_named_in_the_readme_exist():
    for path in set(re.findall(r"recipes/[\w/]+\.yaml", README)) - {"recipes/nope.yaml"}:
        assert (REPO / path).is_file(), path
