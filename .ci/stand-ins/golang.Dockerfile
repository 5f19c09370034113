# Stand-in for the official golang image: Debian's golang-go (and graphviz, which pprof's graph
# view needs) at the path the official image uses.
ARG ROOTFS
FROM ${ROOTFS}
ENV GOPATH=/go \
    PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN ln -s /usr/lib/go /usr/local/go && mkdir -p /go
WORKDIR /go
