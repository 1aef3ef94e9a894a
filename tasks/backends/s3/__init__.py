"""Everything that talks to a bucket, so that BuildKit's S3 layout is changed in one place."""
