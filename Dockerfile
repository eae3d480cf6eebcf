# One image for the four services (ingest, context, responder, vision): the sub-command picks one,
# e.g. `docker run IMAGE ingest`; docker-compose.yml runs each as its own container.
# Validated offline by tests/unit/test_deploy_files.py (no Docker engine on the dev machines).

# --- build: wheels of the package and of every dependency (all ship manylinux wheels, so no compiler)
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject force-includes schemas/ into the wheel as services/_schemas, where services/common/codec.py
# finds the Avro schemas at run time; README.md is the package's readme (hatchling needs it).
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
RUN pip wheel --wheel-dir /wheels .

# --- run: no sources, no build tools, no secrets (configuration comes from the environment / .env)
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/watistream watistream \
    && mkdir -p /data \
    && chown watistream:watistream /data
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels watistream \
    && rm -rf /tmp/wheels
# Local state (the context service's RocksDB table store) lives under DATA_DIR; mount a volume there.
# It is also the working directory, so nothing relative is written into the container layer, and no
# `.env` is read from it (compose passes the configuration as environment variables).
VOLUME ["/data"]
WORKDIR /data
USER watistream:watistream
# Webhooks (INGEST_PORT), context web views (CONTEXT_WEB_PORT), responder and vision health/metrics
# (RESPONDER_WEB_PORT, VISION_WEB_PORT): the defaults of services/common/config.py.
EXPOSE 8080 6066 8081 8082 8083
# No HEALTHCHECK here: one image serves four ports. docker-compose.yml gives each service its own
# check, a python one-liner (slim has no curl) that reads the port from Settings like the service does.
ENTRYPOINT ["watistream"]
CMD ["--help"]
