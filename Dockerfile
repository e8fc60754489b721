# One image for every pipeline process (featurizer, scorer, producer, train); docker-compose.yml
# picks the `deeper` subcommand. CPU-only TensorFlow (tensorflow-cpu, as pyproject.toml pins)
# keeps the image ~1 GB smaller than the CUDA build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DEEPER_DATA_DIR=/data \
    DEEPER_REGISTRY=/registry \
    DEEPER_CACHE_DIR=/cache

# An unprivileged user; the data/registry/cache folders exist (owned by it) before the named
# volumes are mounted there, so Docker initialises fresh volumes with that ownership.
RUN useradd --create-home --uid 10001 deeper \
 && mkdir -p /data /registry /cache /images \
 && chown deeper:deeper /data /registry /cache

WORKDIR /src

# Dependencies first, read from pyproject.toml alone: this ~1 GB layer (TensorFlow) is then
# rebuilt only when the dependencies change, not on every code edit. Works with the classic
# builder too (no BuildKit cache mounts needed).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The project itself; its dependencies are exactly the ones installed above.
COPY . .
RUN pip install --no-deps . \
 && pip check \
 && deeper --help > /dev/null

USER deeper
WORKDIR /home/deeper
CMD ["deeper", "--help"]
