"""``cacheship config ...``: offline tools for cache configs (filled in by the format layer)."""

import click


@click.group()
def config() -> None:
    """Work with BuildKit cache configs."""
