"""``--cache-to type=local,...`` is read with BuildKit's attribute names and defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.request import LocalTargetSpec, RequestError, parse_target


def local(text: str) -> LocalTargetSpec:
    spec = parse_target(text)
    assert isinstance(spec, LocalTargetSpec)
    return spec


def test_buildkit_defaults_an_oci_image_manifest_under_latest() -> None:
    spec = local("type=local,dest=/srv/cache")
    assert (spec.dest, spec.tag) == ("/srv/cache", "latest")
    assert spec.oci_mediatypes and spec.image_manifest


@pytest.mark.parametrize(
    ("text", "oci", "image"),
    [
        ("type=local,dest=/d,oci-mediatypes=false", False, False),
        ("type=local,dest=/d,oci_mediatypes=0", False, False),
        ("type=local,dest=/d,oci-mediatypes=true,image-manifest=false", True, False),
        ("type=local,dest=/d,image-manifest=false", True, False),
        ("type=local,dest=/d,oci-mediatypes=true", True, True),
    ],
)
def test_image_manifest_follows_oci_mediatypes_unless_given(
    text: str, oci: bool, image: bool
) -> None:
    spec = local(text)
    assert (spec.oci_mediatypes, spec.image_manifest) == (oci, image)


def test_buildx_compatible_attributes_are_accepted() -> None:
    spec = local(
        "type=local,dest=/d,tag=v1,mode=max,ignore-error=true,compression=gzip,"
        "compression-level=3,force-compression=false,reset=false"
    )
    assert (spec.tag, spec.mode, spec.compression, spec.compression_level) == (
        "v1",
        "max",
        "gzip",
        3,
    )
    assert spec.ignore_error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type=local", "target.dest: required"),
        ("type=local,dest=", "target.dest: must name a directory"),
        ("type=local,dest=/d,tag=", "target.tag: must not be empty"),
        ("type=local,dest=/d,tag=a\x07", "target.tag: "),
        ("type=local,dest=/d,src=/c", "target.src: unknown attribute"),
        ("type=local,dest=/d,oci-mediatypes=false,image-manifest=true", "needs oci-mediatypes"),
        (
            "type=local,dest=/d,force-compression=true",
            "target.force-compression: recompression is not done",
        ),
        ("type=local,dest=/d,compression=zstd", "target.compression: 'zstd': recompression"),
        ("type=local,dest=/d,reset=true", "target.reset: not supported"),
        ("type=local,dest=/d,compression=lz4", "target.compression: "),
        ("type=local,dest=/d,mode=all", "target.mode: "),
        ("type=local,dest=/d,secret_access_key=x", "credentials are not accepted"),
    ],
)
def test_bad_local_targets_get_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(RequestError) as failure:
        parse_target(text)
    assert message in str(failure.value)
    assert "\n" not in str(failure.value)


def test_the_cli_takes_a_relative_dest_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.cli.export import build_request

    monkeypatch.chdir(str(tmp_path))
    request = build_request(
        "type=s3,bucket=builds,region=us-east-1,name=main", "type=local,dest=node,tag=ci", None
    )
    assert isinstance(request.target, LocalTargetSpec)
    assert request.target.dest == f"{tmp_path}/node" and request.target.tag == "ci"
