# Stand-in for the official python images (slim and full), from a Debian rootfs made by
# debootstrap: Debian's Python 3.11 in a venv at /usr/local, so that `python` and `pip` are in
# /usr/local/bin as in the official image, and pip installs from the wheels baked in here, since
# containers here reach no package index.
ARG ROOTFS
FROM ${ROOTFS}
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
RUN python3 -m venv /usr/local
COPY wheels /usr/share/stand-in-wheels
COPY pip.conf /etc/pip.conf
CMD ["python3"]
