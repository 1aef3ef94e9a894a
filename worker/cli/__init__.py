"""``cacheship``: one console script, one click group, a module per command family.

Every error is one line on stderr, ``error: ...``, with a password-free text; ``--debug``
shows the traceback instead. Exit codes: 0 success, 1 failure (the export failed, the cache
is not sound, a server cannot be reached), 2 invalid command line or request, 130 Ctrl-C.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from worker.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, redact

_state = {"debug": False}

# Each command's module is imported only when that command runs (or --help lists it): a
# command pays for its own imports (Celery, boto3, rich), not for every other command's.
COMMANDS = {
    "export": "worker.cli.export:export_command",
    "status": "worker.cli.status:status_command",
    "worker": "worker.cli.worker:worker_command",
    "demo": "worker.cli.demo:demo_command",
    "verify": "worker.cli.verify:verify_command",
    "prune": "worker.cli.prune:prune_command",
    "schema": "worker.cli.schema:schema_command",
    "config": "worker.cli.config:config",
}


def _error(message: str) -> None:
    click.echo(f"error: {redact(message)}", err=True)


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from tasks.request import error_message

        return f"invalid settings: {error_message(exc)}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CacheshipGroup(click.Group):
    """A group that reports errors as one line (or a traceback with ``--debug``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, _, attr = COMMANDS[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return self.commands.get(cmd_name)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        _state["debug"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _error(f"{exc.format_message().rstrip('.')}{hint}")
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if _state["debug"]:
                raise
            _error(f"{_describe(exc)} (run `cacheship --debug ...` for the traceback)")
            sys.exit(EXIT_FAILED)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=CacheshipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="cacheship", prog_name="cacheship")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Ship BuildKit build caches to S3 with Celery workers.

    \b
    cacheship demo                      the whole stack on this machine, end to end
    cacheship worker                    start a worker (celery worker options pass through)
    cacheship export --from SRC --to DST [--wait]
    cacheship status ID [--wait]        where an export stands
    cacheship verify --cache SPEC       check an exported cache as BuildKit reads it
    cacheship prune --cache SPEC        delete what no name references [--dry-run]
    cacheship schema                    the JSON schema of an export request
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _state["debug"] = debug
