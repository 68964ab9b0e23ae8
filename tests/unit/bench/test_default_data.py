"""Where the benchmarks' files come from without --data: the same answer in --help, the code and the README, and
it works from a clone that has no devset beside it."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench import common

REPO = Path(__file__).parents[3]
SCRIPTS = ["accuracy.py", "load.py", "make_realistic.py", "windows.py", "batch_cost.py"]


def test_jetscribe_devset_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("JETSCRIBE_DEVSET", str(tmp_path))
    assert common.default_data(with_real=False) == [tmp_path]
    assert common.default_data(with_real=True) == [tmp_path, REPO / "bench" / "data" / "real"]


def test_a_named_devset_that_is_not_there_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("JETSCRIBE_DEVSET", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="JETSCRIBE_DEVSET=.*nowhere: no such folder"):
        common.default_data(with_real=False)


def test_without_a_devset_the_small_set_is_made_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("JETSCRIBE_DEVSET", raising=False)
    monkeypatch.setattr(common, "REPO", tmp_path / "clone")  # no ../shared/devset beside it
    made = []
    monkeypatch.setattr(common, "generated_devset", lambda: made.append(1) or tmp_path / "bench-devset")
    assert common.default_data(with_real=False) == [tmp_path / "bench-devset"] and made


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_where_the_files_come_from(script):
    """No script needs --data, and --help does not send a user to a folder their clone lacks."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    usage = done.stdout.split("\n\n")[0]
    assert "--data DATA" not in usage or "[--data DATA" in usage, usage  # optional everywhere
    assert "--data ../shared/devset" not in done.stdout


def test_the_readme_says_what_the_code_does():
    readme = (REPO / "README.md").read_text()
    assert "`$JETSCRIBE_DEVSET`" in readme and "bench-devset" in readme
    assert "--data ../shared/devset" not in readme
