# Slim, non-root image of the gateway.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv
# The app's lock first (exact versions, every file checked against its hash; its own layer,
# rebuilt only when the lock changes), then the gateway itself with nothing more.
COPY requirements.txt ./
RUN pip install --require-hashes --no-deps -r requirements.txt
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --home-dir /srv gateway \
    && mkdir -p /srv/data && chown gateway /srv/data
USER gateway
# JSON log lines (one object each, with request ids) for the log collector.
ENV HOST=0.0.0.0 PORT=8000 SQLITE_PATH=/srv/data/users.db LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["python", "-m", "app"]
