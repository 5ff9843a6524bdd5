# serving-planner: one image for the API (`splan serve`), the Celery worker (`splan worker`) and
# the schema migration (`splan db upgrade`); docker-compose.yml picks the role with the command.
FROM python:3.11-slim

# PYTHONPATH=/app: `splan` imports service/ from /app, not from site-packages, because
# service/db/migrate.py finds the Alembic scripts at <parent of service>/migrations = /app/migrations.
# `pip install .` still provides the dependencies and the `splan` console script.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    SPLAN_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY openapi ./openapi
RUN pip install . \
    && rm -rf build ./*.egg-info \
    && python -c "from service.db.migrate import MIGRATIONS_DIR as d; assert (d / 'env.py').is_file(), d" \
    && splan --help > /dev/null

# Non-root; /data holds the embedded SQLite file when no DATABASE_URL is set.
RUN groupadd --system --gid 10001 splan \
    && useradd --system --uid 10001 --gid splan --home-dir /data --no-create-home --shell /usr/sbin/nologin splan \
    && mkdir -p /data \
    && chown splan:splan /data
USER splan

EXPOSE 8000
# Liveness only (no curl in slim); docker-compose.yml checks /readyz (database and broker) for the API
# and overrides this check for the worker and the migration, which serve no HTTP.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]

ENTRYPOINT ["splan"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
