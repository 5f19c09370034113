# Stand-in for prom/prometheus: Debian's prometheus binary (the same release) laid out as the
# official image has it: /bin/prometheus, its config at /etc/prometheus/prometheus.yml, data in
# /prometheus, run as nobody; and the web UI's files where Debian's binary looks for them.
ARG ROOTFS
FROM ${ROOTFS}
COPY prometheus /bin/prometheus
COPY web /usr/share/prometheus/web
COPY prometheus.yml /etc/prometheus/prometheus.yml
RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
