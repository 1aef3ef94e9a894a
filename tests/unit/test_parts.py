"""Part sizes: no blob may need more than S3's 10,000 parts."""

from hypothesis import given
from hypothesis import strategies as st

from tasks.backends.s3.ingester import MAX_PARTS, MiB, part_size_for


@given(size=st.integers(min_value=0, max_value=5 * 1024**4), minimum=st.sampled_from([5, 8, 16]))
def test_parts_never_exceed_limit(size: int, minimum: int) -> None:
    part = part_size_for(size, minimum * MiB)
    assert part >= minimum * MiB
    assert part % MiB == 0
    assert -(-size // part) <= MAX_PARTS


def test_small_blobs_keep_the_minimum() -> None:
    assert part_size_for(100 * MiB, 8 * MiB) == 8 * MiB
    assert part_size_for(200_000 * MiB, 8 * MiB) == 20 * MiB
