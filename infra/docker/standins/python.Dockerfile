# Python 3.11 on a Debian bookworm base, standing in for python:3.11-slim-bookworm where
# no registry is reachable: infra/docker/Dockerfile builds on it (PYTHON_IMAGE).
# `python` is python3, as in the official image. The host's CA bundle, mounted at
# /run/host-ca.crt for this build when the host has one, replaces the image's, so pip
# trusts what the host trusts (e.g. a TLS-intercepting proxy in front of PyPI).
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && if [ -s /run/host-ca.crt ]; then cat /run/host-ca.crt >/etc/ssl/certs/ca-certificates.crt; fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python"]
