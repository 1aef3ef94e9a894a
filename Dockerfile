# syntax=docker/dockerfile:1
#
# The cacheship image. One image runs every role:
#   worker (the default):  docker run IMAGE                      -> cacheship worker
#   any CLI command:       docker run IMAGE export --from ... --to ...
#   Flower:                docker run --entrypoint celery IMAGE -A worker flower
#
# Two stages: `build` has a compiler and pip; `runtime` gets only the finished virtualenv.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Only needed when a dependency ships no wheel for the target platform; it never reaches the
# runtime stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# Installed under the same path in both stages, so its scripts' shebangs stay valid.
RUN python -m venv /opt/cacheship
ENV PATH=/opt/cacheship/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes. Empty
# package stubs let pip resolve the project's dependencies before the code is copied in.
COPY pyproject.toml README.md ./
RUN mkdir -p tasks worker \
    && touch tasks/__init__.py worker/__init__.py \
    && pip install . \
    && pip uninstall -y cacheship \
    && rm -rf tasks worker build ./*.egg-info

# Then the code itself (not editable: the runtime stage has no /src).
COPY tasks/ tasks/
COPY worker/ worker/
RUN pip install --no-deps . \
    && cacheship --help > /dev/null

# ---- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/cacheship/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CACHESHIP_HEARTBEAT_FILE=/run/cacheship/heartbeat

# A fixed, non-root uid/gid (10001) so Kubernetes' runAsNonRoot can check it and volumes can be
# shared by group. The heartbeat directory is writable even without a volume on it.
RUN groupadd --system --gid 10001 cacheship \
    && useradd --system --uid 10001 --gid cacheship --home-dir /home/cacheship \
        --create-home --shell /usr/sbin/nologin cacheship \
    && install -d -o cacheship -g cacheship -m 0755 /run/cacheship

COPY --from=build /opt/cacheship /opt/cacheship

USER 10001:10001
WORKDIR /home/cacheship

# A worker touches $CACHESHIP_HEARTBEAT_FILE every few seconds while healthy. The check only
# compares the file's age with a shell: no Python process per check. (Flower and one-off CLI
# containers override or ignore it.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "m=$(stat -c %Y \"$CACHESHIP_HEARTBEAT_FILE\") || exit 1; [ $(( $(date +%s) - m )) -le 120 ]"]

# Celery's warm shutdown on SIGTERM waits for running tasks; give `docker stop` a long
# --time (the compose file sets stop_grace_period) or running tasks are killed.
STOPSIGNAL SIGTERM

ENTRYPOINT ["cacheship"]
CMD ["worker"]
