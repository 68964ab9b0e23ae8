# One image for all three services; compose picks the module to run.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY jetscribe ./jetscribe
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
