# Image of the fusionrec worker and command line, used by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY models ./models
COPY stream ./stream
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/fusionrec fusionrec \
    && mkdir -p /var/lib/fusionrec \
    && chown fusionrec /var/lib/fusionrec

USER fusionrec
ENV FUSIONREC_DATA_DIR=/var/lib/fusionrec
EXPOSE 6066
CMD ["fusionrec", "worker"]
