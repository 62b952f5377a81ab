# syntax=docker/dockerfile:1
# kubetriage: one image for the operator (`kubetriage run`, the default) and the
# worker pods it creates (`kubetriage worker`, set as the pod's command).
#
#   make image            # docker build -t kubetriage:<version> .
#
# Two stages: the builder turns this repository and every dependency into
# wheels; the final stage installs those wheels from a bind mount, offline, so
# it holds no compiler, no source tree, no wheel files and no pip cache.
# The base is pinned to a patch release and Debian suite so rebuilds are
# reproducible; bump it deliberately (and pin the digest in CI if you can).
ARG PYTHON_IMAGE=python:3.12.12-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY analyzers/ analyzers/
# The project wheel plus a wheel for every dependency (all publish manylinux
# wheels, psycopg via psycopg[binary]), so the final stage needs no network.
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="kubetriage" \
      org.opencontainers.image.description="Kubernetes operator that triages monitoring alerts and failed test runs into false positives and valid failures" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kubetriage/kubetriage" \
      org.opencontainers.image.url="https://github.com/kubetriage/kubetriage" \
      org.opencontainers.image.documentation="https://github.com/kubetriage/kubetriage#readme" \
      org.opencontainers.image.vendor="kubetriage"
# No .pyc writes at run time (the root filesystem is read-only in the chart and
# in worker pods), unbuffered logs, and HOME on the writable /tmp emptyDir.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# uid/gid 10001: the same ids operator/kubetriage/controller/pools.py (WORKER_UID) and the chart's
# securityContext run as, so files and runAsNonRoot checks agree.
RUN groupadd --system --gid 10001 kubetriage \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kubetriage
# Install from the builder's wheels through a bind mount: nothing of them stays in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "kubetriage==${VERSION}"
WORKDIR /tmp
USER 10001:10001
# ingest HTTP, Prometheus /metrics, liveness /healthz (KUBETRIAGE_INGEST_PORT,
# KUBETRIAGE_METRICS_PORT, KUBETRIAGE_HEALTH_PORT).
EXPOSE 8000 8080 8081
ENTRYPOINT ["kubetriage"]
CMD ["run"]
