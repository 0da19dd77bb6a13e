# SecureCollab: one container, one server (`securecollab serve`, plus the SQLite writer
# process it starts and reaps itself).
#   docker build -t securecollab .
#   docker run -p 8080:8080 -p 61613:61613 -v securecollab-data:/data securecollab
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY securecollab ./securecollab
COPY stomp ./stomp
COPY config.toml ./config.toml
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin securecollab \
 && mkdir -p /data && chown securecollab:securecollab /data && chmod 700 /data

# State lives in /data: the SQLite database and the generated JWT secret (0600).
ENV SECURECOLLAB_SERVER__DATA_DIR=/data \
    SECURECOLLAB_STORE__URL=sqlite:////data/securecollab.db \
    SECURECOLLAB_HTTP__HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 8080 61613

USER securecollab
WORKDIR /data
# curl is not in the slim image: probe with the Python standard library
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

# SIGTERM (docker stop) shuts down gracefully and exits 0 within [server] shutdown_timeout_s
STOPSIGNAL SIGTERM
ENTRYPOINT ["securecollab"]
CMD ["serve", "--host", "0.0.0.0"]
