# OpenAI-compatible HTTP API (`coolfusion gateway`): no model, no torch, CPU only.
#   docker build -f deploy/docker/gateway.Dockerfile -t coolfusion/gateway:0.1.0 .
# COOLFUSION_ORCHESTRATOR=orchestrator:50051 (README "OpenAI-compatible API").
# BASE_IMAGE: python:3.11-slim, or deploy/offline-base.sh's image where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only what the gateway imports (tests/test_deploy.py checks it runs without torch and
# transformers, and that these pins match pyproject.toml); the package itself --no-deps.
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "grpcio==1.85.1" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1" \
        "protobuf>=6.31" "asyncio-throttle>=1.0.2" "rich>=13" "prometheus-client>=0.20" \
        "fastapi==0.165.0" "uvicorn==0.54.0" "sse-starlette==3.7.0" "pydantic>=2.7"
COPY . /tmp/coolfusion
RUN /opt/venv/bin/pip install --no-deps /tmp/coolfusion \
    && /opt/venv/bin/python -c "import coolfusion.services.gateway.serve, coolfusion.clients.cli"

# The source stays in the builder stage; the final image gets the venv.
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    COOLFUSION_HOST=0.0.0.0 \
    COOLFUSION_PORT=8000
COPY --from=builder /opt/venv /opt/venv

RUN groupadd --system --gid 10001 coolfusion \
    && useradd --system --uid 10001 --gid coolfusion --home-dir /home/coolfusion --create-home coolfusion
USER 10001:10001
WORKDIR /home/coolfusion

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=30s --start-period=30s --retries=3 \
    CMD coolfusion healthcheck "127.0.0.1:${COOLFUSION_PORT}" --http || exit 1
ENTRYPOINT ["coolfusion"]
CMD ["gateway"]
