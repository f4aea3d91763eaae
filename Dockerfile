# syntax=docker/dockerfile:1
# Multi-stage build: compile in the official Rust image, run on distroless (glibc, CA
# certificates, no shell, non-root). Both stages are Debian 12, so the glibc matches.
# Build: docker build -t trailhose .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# No .git in the context: `--build-arg TRAILHOSE_COMMIT=$(git rev-parse --short=12 HEAD)`
# stamps `trailhose --version`.
ARG TRAILHOSE_COMMIT=""
ENV TRAILHOSE_COMMIT=$TRAILHOSE_COMMIT
# Cache mounts keep the registry and target dir across builds; the binary is copied out of the
# cached target dir in the same step, without its debug info (symbols stay for backtraces),
# as scripts/build-image.sh does.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin trailhose \
    && mkdir -p /out && objcopy --strip-debug target/dist/trailhose /out/trailhose

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/trailhose /usr/local/bin/trailhose
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/trailhose"]
CMD ["run", "--config", "/etc/trailhose/trailhose.toml"]
