# personabot: one image for every process of docker-compose.yml (Slack web, Discord worker, release checks).
#   docker build -t personabot .
#   docker run --env-file .env -p 8000:8000 -v personabot-data:/data personabot
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch, the version the Makefile installs; PyPI's default Linux wheel is a multi-GB CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p bot finetune && touch bot/__init__.py finetune/__init__.py \
    && pip install . && pip uninstall -y personabot && rm -rf bot finetune build
COPY bot bot
COPY finetune finetune
RUN pip install --no-deps . && rm -rf build
COPY personas personas
COPY knowledge knowledge
COPY Procfile slack-manifest.yml ./

# Not root. /data holds what personabot writes (PERSONABOT_DATA_DIR): mount a volume there, or on the folders
# below (docker-compose.yml does); they exist here so that a fresh volume takes their owner, not root.
RUN useradd --create-home --uid 10001 personabot \
    && mkdir -p /data/workspaces /data/models /data/knowledge \
    && chown -R personabot:personabot /data /app/knowledge
USER personabot
ENV PERSONABOT_DATA_DIR=/data \
    PORT=8000

EXPOSE 8000
# /healthz is served with Slack (HTTP or Socket Mode) on $PORT; a Discord-only process serves it only when
# PERSONABOT_PUBLIC_URL is set (for avatars), so its service turns this check off (docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"

CMD ["personabot", "run"]
