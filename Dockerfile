# syntax=docker/dockerfile:1
# raft-host in a container: a build stage with the pinned Rust toolchain, then
# a slim runtime image that runs as a non-root user with its data in a volume.
#
#   docker build -t raft-host .
#   docker run --rm raft-host --help
#   docker compose -f deploy/compose.yaml up     (three members)
#
# The base images are arguments, so a mirror or a pinned digest can be used.
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The guests built into the binary are WebAssembly components.
RUN rustup target add wasm32-wasip2
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p raft-host \
    && install -D -m 0755 target/release/raft-host /out/raft-host

FROM ${RUNTIME_IMAGE}
# A fixed uid/gid, so a volume's owner can be set from outside (Kubernetes
# fsGroup, a host directory chowned to 10001).
RUN groupadd --system --gid 10001 raft \
    && useradd --system --uid 10001 --gid raft --home-dir /data --shell /usr/sbin/nologin raft \
    && mkdir -p /data \
    && chown raft:raft /data
COPY --from=build /out/raft-host /usr/local/bin/raft-host
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# Every `serve` flag has a RAFT_HOST_* variable; these are the container's
# defaults. A cluster still needs RAFT_HOST_ID, RAFT_HOST_CLUSTER,
# RAFT_HOST_ADVERTISE and RAFT_HOST_PEERS (or RAFT_HOST_JOIN), and either
# certificates (RAFT_HOST_CA, RAFT_HOST_CERT, RAFT_HOST_KEY) or
# RAFT_HOST_PLAINTEXT=true.
ENV RAFT_HOST_DATA_DIR=/data \
    RAFT_HOST_LISTEN=0.0.0.0:7001 \
    RAFT_HOST_METRICS_LISTEN=0.0.0.0:8001 \
    RAFT_HOST_LOG_FORMAT=json
# 7001: clients and members (gRPC); 8001: /metrics, /healthz, /readyz.
EXPOSE 7001 8001
# The gRPC health service: SERVING while online with a known leader. Over
# TLS the probe uses the same RAFT_HOST_CA/CERT/KEY as the member (a member
# certificate counts as admin).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["raft-host", "endpoint", "probe", "--addr", "127.0.0.1:7001"]
ENTRYPOINT ["raft-host"]
CMD ["serve"]
