"""The Celery tasks, one module each; thin glue between messages and the domain code.

- ``export``: validate, read the source, plan; dispatch ``chord(copy_layer × N, finalize)``.
- ``copy_layer``: one blob into the target (one writer per blob across the fleet).
- ``finalize``: config blob, manifest blob, then the names; the export's final state.
"""
