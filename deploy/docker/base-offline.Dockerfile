# A stand-in for python:3.11-slim on a machine that reaches apt and pip but no image registry:
# Debian's Python in a venv on PATH, over a rootfs that `debootstrap` made and `docker import`
# loaded (deploy/offline-base.sh builds both). The images take it as --build-arg BASE_IMAGE=...
ARG ROOTFS_IMAGE=coolfusion/debian-rootfs:bookworm
FROM ${ROOTFS_IMAGE}

ENV LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# The host's own extra CAs (its /usr/local/share/ca-certificates, e.g. a TLS-inspecting proxy's),
# so that apt and pip inside the builds trust what the host trusts; pip reads the system bundle.
COPY ca/ /usr/local/share/ca-certificates/
# `python` and `pip` as in the official image; the venv keeps pip off Debian's system packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python \
    && python -m pip --version
CMD ["python3"]
