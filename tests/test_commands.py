"""What every console script shares: its own name in --help, no DeepSpeed start-up noise, one storage-option
argument (with the old spelling still accepted), and a user's mistake as one `error:` line with exit 2."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from data_pipeline.commands import UserError, add_storage_option, help_description, reports_user_errors, storage_options

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SCRIPTS = sorted(ENTRY_POINTS)
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_the_command_as_users_type_it_and_prints_nothing_else(script: str):
    result = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} "), result.stdout[:200]
    assert result.stderr == ""  # e.g. DeepSpeed's "Setting accelerator to CPU" warning on import
    # the description is the module docstring's whole first paragraph (its first line alone stopped mid-sentence)
    described = help_description(importlib.import_module(ENTRY_POINTS[script].split(":")[0]).__doc__)
    assert described.endswith(".") and described in " ".join(result.stdout.split()), result.stdout[:600]


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_storage_option(parser, "tests")
    return storage_options(parser.parse_args(argv))


def test_storage_options_are_json_where_they_parse_and_the_old_json_spelling_still_works():
    assert parse("--storage-option", "endpoint_url=http://127.0.0.1:9000", "--storage-option", "anon=false") == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
    }
    assert parse("--storage-options", '{"anon": true, "key": "k"}', "--storage-option", "key=other") == {
        "anon": True,
        "key": "other",
    }
    with pytest.raises(UserError, match="--storage-option endpoint_url: expected KEY=VALUE"):
        parse("--storage-option", "endpoint_url")
    with pytest.raises(UserError, match="--storage-options \\[1\\]: expected a JSON object"):
        parse("--storage-options", "[1]")


def test_a_user_error_is_one_line_per_problem_and_exit_2(capsys):
    @reports_user_errors
    def main(argv: list[str] | None = None) -> int:
        raise UserError("a.json: model.width: must be positive\na.json: run: required but missing; add it")

    assert main([]) == 2
    assert capsys.readouterr().err == (
        "error: a.json: model.width: must be positive\nerror: a.json: run: required but missing; add it\n"
    )

    @reports_user_errors
    def fetch(argv: list[str] | None = None) -> int:
        raise UserError("https://me:hunter2@example.org/x.tar: no such file; check the URL")

    assert fetch([]) == 2
    assert capsys.readouterr().err == "error: https://***@example.org/x.tar: no such file; check the URL\n"


def test_log_lines_of_a_command_mask_the_credentials_of_urls():
    # as the trainer, few-shot and fine-tuning commands set up logging; the loader warns about a shard by its URL
    script = (
        "import logging; from data_pipeline.commands import configure_logging; configure_logging(); "
        "logging.getLogger('data_pipeline.load.stream').warning("
        "'%s: skipped %s', 'https://me:hunter2@example.org/x.tar', 'corrupt_image')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stderr == ("WARNING data_pipeline.load.stream: https://***@example.org/x.tar: skipped corrupt_image\n")


def test_convert_checkpoint_reports_a_bad_storage_option_in_one_line(tmp_path: Path):
    result = subprocess.run(
        [
            str(BIN / "convert-checkpoint"),
            str(tmp_path),
            "--to",
            "hf",
            "--out",
            str(tmp_path / "o"),
            "--storage-option",
            "oops",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip().splitlines()) == (
        2,
        ["error: --storage-option oops: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000"],
    )
