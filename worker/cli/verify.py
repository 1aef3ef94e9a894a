"""``cacheship verify``: is an exported cache sound, the way BuildKit's importer reads it?"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from worker.cli.common import EXIT_FAILED, EXIT_USAGE, fail, human_bytes, parse_option_spec
from worker.cli.report import dumps

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tasks.request import S3Spec
    from tasks.verify import BlobCheck, VerifyReport


# boto3, rich and the checks are imported when the command runs (``cacheship --help`` lists
# this command without them).


def s3_client(spec: S3Spec) -> S3Client:
    """boto3 with the spec's endpoint, else the CACHESHIP_S3_* defaults; AWS's credentials."""
    from tasks.settings import Settings

    return Settings().s3_client(spec)


def report_lines(report: VerifyReport) -> list[str]:
    """What was checked, each line marked ok or not, then the problems."""
    lines = []
    for named in report.names:
        where = f"{named.key} ({named.name})" if report.directory else (
            named.key if report.ref else f"s3://{report.bucket}/{named.key}"
        )
        if named.found:
            lines.append(
                f"  config   {where}: {named.layers} layers, {named.records} records "
                f"({human_bytes(named.config_size)})"
            )
        else:
            lines.append(f"  config   {where}: not readable")
    present = sum(1 for b in report.blobs if b.found and b.stored_size == b.size)
    lines.append(
        f"  blobs    {present} of {len(report.blobs)} present with their sizes "
        f"({human_bytes(report.bytes_total)})"
    )
    if report.deep:
        hashed = sum(1 for b in report.blobs if b.hashed)
        lines.append(f"  sha256   {hashed} blobs read back and hashed")
    for problem in report.problems:
        lines.append(f"  problem  {problem}")
    return lines


@click.command("verify", short_help="Check an exported cache as BuildKit reads it.")
@click.option(
    "--cache",
    "cache",
    required=True,
    metavar="SPEC",
    help="The cache: type=s3,bucket=B[,name=N,prefix=P,endpoint_url=URL,...], "
    "type=registry,ref=HOST/REPO[:TAG|@DIGEST][,registry.insecure=true] or "
    "type=local,src=DIR[,tag=T].",
)
@click.option("--deep", is_flag=True, help="Also read every blob back and check its sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def verify_command(cache: str, deep: bool, as_json: bool) -> None:
    """Check an exported cache as BuildKit's importer reads it; exit 0 only when sound.

    S3: reads the config under every name (BuildKit reads the first), checks that it
    parses, that every layer has its diffID and that every layer blob exists with its
    size. The endpoint comes from the spec or CACHESHIP_S3_ENDPOINT_URL, credentials from
    AWS's usual chain. Registry: reads the manifest under the tag (or digest) and the config
    (each refused over BuildKit's 1 MiB), parses the records and HEADs every layer blob, with
    the credentials of docker's config.json. Local: reads index.json, the manifest under the
    tag and the config (each checked against its digest), parses the records and checks
    every layer blob.
    --deep also checks every blob's sha256.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from tasks.request import LocalSpec, RegistrySpec
    from tasks.verify import cache_from_line, verify_cache, verify_local_cache

    spec = parse_option_spec(cache, "--cache", "cache")
    if isinstance(spec, LocalSpec):
        directory = Path(os.path.abspath(spec.src))
        if not directory.is_dir():
            fail(f"--cache: cache.src: {directory} is not a directory", EXIT_USAGE)
        spec = spec.model_copy(update={"src": str(directory)})
    err = Console(stderr=True, highlight=False)

    def run(on_blob: Callable[[BlobCheck], None] | None) -> VerifyReport:
        if isinstance(spec, LocalSpec):
            return verify_local_cache(Path(spec.src), spec, deep=deep, on_blob=on_blob)
        if isinstance(spec, RegistrySpec):
            from tasks.backends.registry.client import RegistryClient
            from tasks.backends.registry.verify import verify_registry_cache

            ref = spec.reference
            client = RegistryClient(ref.endpoint_host, insecure=spec.registry_insecure)
            try:
                return verify_registry_cache(client, spec, deep=deep, on_blob=on_blob)
            finally:
                client.close()
        return verify_cache(s3_client(spec), spec, deep=deep, on_blob=on_blob)

    if deep and err.is_terminal and not as_json:
        with Progress(
            TextColumn("reading blobs back"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=err,
            transient=True,
        ) as progress:
            bar = progress.add_task("verify", total=None)

            def advance(blob: BlobCheck) -> None:
                progress.advance(bar, blob.size)

            report = run(advance)
    else:
        report = run(None)
    if as_json:
        click.echo(dumps(report.to_json()))
    else:
        if isinstance(spec, LocalSpec):
            click.echo(f"cache {spec.src}")
        elif isinstance(spec, RegistrySpec):
            click.echo(f"cache {spec.reference}")
        else:
            click.echo(f"cache s3://{spec.bucket}/{spec.manifest_key(spec.name[0])}")
        for line in report_lines(report):
            click.echo(line)
        if report.sound:
            click.echo(f"sound: BuildKit can import it with\n  {cache_from_line(spec)}")
    if not report.sound:
        count = len(report.problems)
        fail(
            f"the cache is not sound: {count} problem{'s' if count != 1 else ''}"
            + (f" (first: {report.problems[0]})" if report.problems else ""),
            EXIT_FAILED,
        )
