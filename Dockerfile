# credsync's container image, built from source (needs a registry for the base images).
# Without a registry, scripts/build-local-images builds an equivalent credsync:local from a
# binary built on the host.
#
#   docker build -t credsync:latest .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# The whole context (.dockerignore keeps out target/, .git and .env): the manifest may name
# benches, tests or examples that cargo wants to see, and the binary embeds openapi.yaml and
# the migrations.
COPY . .
# The registry and target caches make rebuilds incremental; the binary is copied out of the
# cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin credsync \
    && cp target/release/credsync /usr/local/bin/credsync

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 credsync \
    && useradd --system --uid 10001 --gid credsync --home-dir /nonexistent --shell /usr/sbin/nologin credsync
COPY --from=builder /usr/local/bin/credsync /usr/local/bin/credsync
USER 10001:10001
ENV CREDSYNC_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["credsync", "healthcheck", "--url", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["credsync"]
CMD ["serve"]
