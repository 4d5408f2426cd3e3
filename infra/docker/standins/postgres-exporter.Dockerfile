# Stands in for quay.io/prometheuscommunity/postgres-exporter from Debian's package
# (0.11), with the contract compose.yaml uses: DATA_SOURCE_URI, _USER and _PASS in the
# environment, metrics on :9187, run as nobody. (`daemon` satisfies the package's
# init-system dependency without systemd.)
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      prometheus-postgres-exporter daemon \
 && rm -rf /var/lib/apt/lists/*
USER nobody
EXPOSE 9187
ENTRYPOINT ["/usr/bin/prometheus-postgres-exporter"]
