# syntax=docker/dockerfile:1
# tokengate-companion: built with the README's release command, run on a distroless
# image (glibc and libgcc only, no shell, non-root). Build from the repository root:
#
#   docker build -f deploy/companion.Dockerfile -t tokengate-companion .
#
# The build context is the whole workspace (cargo needs every member's manifest);
# deploy/companion.Dockerfile.dockerignore keeps target/, .venv/ and .git/ out of it.
#
# The base images are build arguments, so a machine with its own registry (or none,
# like the test machines: tests/tests/containers.rs) can name local equivalents:
#   BUILDER_IMAGE  the Rust toolchain (Debian 12, the runtime's glibc)
#   RUNTIME_IMAGE  glibc + libgcc, a `nonroot` user (uid 65532)
#   PREBUILT       empty (the default): build from source. Else a folder of the build
#                  context that holds tokengate-companion and tokengate-probe already
#                  built for Debian 12 (scripts/container-images: .container-bin),
#                  which are copied instead; BUILDER_IMAGE then needs only a shell.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# Rust 1.95 is the toolchain the project is built and tested with.
FROM ${BUILDER_IMAGE} AS build
ARG PREBUILT=
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ -n "$PREBUILT" ]; then \
      install -D -m 0755 -t /out "$PREBUILT/tokengate-companion" "$PREBUILT/tokengate-probe"; \
    else \
      cargo build --release -p tokengate-companion -p tokengate-probe \
      && install -D -m 0755 -t /out target/release/tokengate-companion target/release/tokengate-probe; \
    fi

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/tokengate-companion /out/tokengate-probe /usr/local/bin/
# Every flag has a TOKENGATE_* variable (README, "The companion"); the default listen
# address is loopback, which nothing outside the container could reach.
ENV TOKENGATE_LISTEN=0.0.0.0:7070
EXPOSE 7070
USER 65532:65532
# The image has no shell: the compose file's health check runs tokengate-probe.
HEALTHCHECK --interval=5s --timeout=3s --retries=12 CMD ["/usr/local/bin/tokengate-probe", "http://127.0.0.1:7070/readyz"]
ENTRYPOINT ["/usr/local/bin/tokengate-companion"]
