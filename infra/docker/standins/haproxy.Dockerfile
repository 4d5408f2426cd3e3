# Stands in for haproxy:2.8-alpine from Debian's haproxy (2.6), with the part of its
# contract compose.yaml uses (it replaces the entrypoint): haproxy, sh and awk on PATH,
# the haproxy user, and the default resolvers from /etc/resolv.conf.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/*
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
