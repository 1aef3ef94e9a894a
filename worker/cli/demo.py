"""``cacheship demo``: the README's main job, the whole pipeline on this machine."""

from __future__ import annotations

from typing import Any

import click

from worker.cli.common import EXIT_FAILED, fail


@click.command("demo", short_help="Run the whole pipeline on this machine, end to end.")
@click.option(
    "--keep", is_flag=True, help="Leave the stack (Redis, S3, worker, Flower) running until Ctrl-C."
)
def demo_command(keep: bool) -> None:
    """Start Redis, S3, a worker and Flower locally, export a sample BuildKit cache with live
    progress, verify it, and show how docker buildx would import it. Cleans up after itself.
    """
    from rich.console import Console

    from worker.cli.watch import watch
    from worker.demo import DemoError, detach_output, run_demo

    err = Console(stderr=True, highlight=False)

    def follow(client: Any, export_id: str) -> Any:
        return watch(client, export_id, err, plain_write=lambda line: click.echo(line, err=True))

    try:
        run_demo(say=click.echo, follow=follow, keep=keep)
    except DemoError as exc:
        fail(f"demo: {exc}", EXIT_FAILED)
    except BrokenPipeError:
        # Nobody reads any more (``cacheship demo | head``): the stack is already stopped.
        detach_output()
        raise SystemExit(EXIT_FAILED) from None
