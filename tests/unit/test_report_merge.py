"""The export summary says which names were merged into, and what was dropped."""

from __future__ import annotations

from worker.cli.report import summary_lines


def test_summary_names_merges_with_counts() -> None:
    result = {
        "status": "complete",
        "export_id": "e1",
        "bucket": "ci-cache",
        "names": ["manifests/main", "manifests/pr-1"],
        "merged": [
            {
                "name": "main",
                "key": "manifests/main",
                "merged": True,
                "records_existing": 40,
                "records_new": 7,
                "records_after": 44,
                "results_missing": 0,
                "results_expired": 2,
                "results_over_limit": 0,
            }
        ],
    }
    lines = summary_lines(result)
    assert (
        "  name      s3://ci-cache/manifests/main (merged: 40 stored + 7 new records -> 44; "
        "dropped 2 expired)"
    ) in lines
    assert "  name      s3://ci-cache/manifests/pr-1" in lines


def test_summary_without_merge_is_unchanged() -> None:
    lines = summary_lines({"status": "complete", "bucket": "b", "names": ["manifests/main"]})
    assert lines[-1] == "  name      s3://b/manifests/main"
