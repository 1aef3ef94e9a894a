"""Everything that touches a cache directory on disk, kept apart from the network backends."""
