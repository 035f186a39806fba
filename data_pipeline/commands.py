"""What every command-line entry point of both packages shares: the errors a user can cause and how they are
reported, command-line values, and the storage-option argument.

A user's mistake (a missing file, a bad field, an unreachable URL, a checkpoint of another variant) raises a
`UserError` whose message names the file, field or URL and what to do instead. A `main` decorated with
`reports_user_errors` prints it as `error: <message>` on stderr and exits with `USER_ERROR` (2); anything else is a
bug and keeps its traceback. `data_pipeline` is the lower of the two packages (`pretrain` imports it, never the
reverse), so this module and `data_pipeline.storage` are where both find what they share.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR = 2
"""Exit status of every command after a user's mistake (argparse uses it for bad options too)."""
EXIT_PREEMPTED = 75
"""Exit status of the trainers (pre-training, vit-finetune) after a preemption signal, once the checkpoint is saved
(EX_TEMPFAIL): rerun with --resume auto."""


class UserError(Exception):
    """A mistake the user can fix; the message says which file, field or URL and how. May hold several problems,
    one per line."""


def report(error: UserError) -> int:
    """Print `error: <line>` for each line of the message on stderr, credentials in URLs masked; returns
    USER_ERROR."""
    from data_pipeline.storage import masked_urls  # storage imports fsspec: not for every command's start-up

    for line in masked_urls(str(error)).splitlines() or [type(error).__name__]:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return USER_ERROR


class _MaskedUrls(logging.Filter):
    """Masks the credentials of URLs in every record a handler emits, ours and libraries' alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        from data_pipeline.storage import masked_urls

        try:
            message = record.getMessage()
        except Exception:  # a malformed call: left to the handler, which reports it as logging always does
            return True
        record.msg, record.args = masked_urls(message), None
        if record.exc_info and not record.exc_text:  # a traceback names URLs too
            record.exc_text = masked_urls(logging.Formatter().formatException(record.exc_info))
        return True


def configure_logging(format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Warnings and errors on stderr, for a command's `main`: the one place log lines get their URLs masked, as
    `report` masks error lines (a shard URL with a user and password appears in the loader's warnings)."""
    logging.basicConfig(level=logging.WARNING, format=format)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, _MaskedUrls) for existing in handler.filters):
            handler.addFilter(_MaskedUrls())


def reports_user_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's `main(argv) -> exit status` so that a UserError becomes one line and exit 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as error:
            return report(error)

    return wrapped


def help_description(doc: str | None) -> str:
    """A module docstring's first paragraph on one line: a command's --help description (its first line alone stops
    mid-sentence when the paragraph wraps)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def json_or_text(text: str) -> Any:
    """A command-line value: JSON where it parses (numbers, true/false, null, lists, objects), else the text itself,
    so that L/16 or s3://bucket/x need no quotes."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """`["endpoint_url=http://127.0.0.1:9000", "anon=false"]` -> {"endpoint_url": ..., "anon": False}."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option {pair}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        options[key] = json_or_text(raw)
    return options


def add_storage_option(parser: argparse.ArgumentParser, applies_to: str) -> None:
    """`--storage-option KEY=VALUE` (repeatable), read back by `storage_options(args)`. The spelling vit-finetune
    used to take, `--storage-options JSON`, is still accepted (and not shown)."""
    parser.add_argument(
        "--storage-option",
        dest="storage_option_pairs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"fsspec option for {applies_to}, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable; credentials come "
        "from the usual AWS environment variables)",
    )
    parser.add_argument("--storage-options", dest="storage_options_json", metavar="JSON", help=argparse.SUPPRESS)


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of `add_storage_option`'s arguments; KEY=VALUE pairs win over the JSON object."""
    options: dict[str, Any] = {}
    if args.storage_options_json is not None:
        options = json_or_text(args.storage_options_json)
        if not isinstance(options, dict):
            raise UserError(
                f"--storage-options {args.storage_options_json}: expected a JSON object, e.g. "
                '\'{"endpoint_url": "http://127.0.0.1:9000"}\'; or use --storage-option KEY=VALUE'
            )
    return options | parse_storage_options(args.storage_option_pairs)
