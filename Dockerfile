# syntax=docker/dockerfile:1
# keygate: a release build in the Rust image, run from distroless as uid 10001.
#   docker build -t keygate .
#   docker run --rm -p 50051:50051 keygate serve --database-url postgres://…
# build.rs uses a vendored protoc, so the builder needs no extra packages.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The caches speed up rebuilds; the binary is copied out of them in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keygate \
    && install -m 0755 target/release/keygate /usr/local/bin/keygate

# glibc and libgcc only (the binary links nothing else), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/keygate /usr/local/bin/keygate
# The Helm chart runs as this uid too (runAsUser 10001).
USER 10001:10001
# A writable working directory for the SQLite default (sqlite://keygate.db);
# with PostgreSQL nothing is written.
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["keygate"]
CMD ["serve"]
