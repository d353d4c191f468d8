# syntax=docker/dockerfile:1
# tokengate-companion: built with the README's release command, run on a distroless
# image (glibc and libgcc only, no shell, non-root). Build from the repository root:
#
#   docker build -f deploy/companion.Dockerfile -t tokengate-companion .
#
# The build context is the whole workspace (cargo needs every member's manifest);
# deploy/companion.Dockerfile.dockerignore keeps target/, .venv/ and .git/ out of it.

# Debian 12 builder and Debian 12 runtime: the binary links against the same glibc.
# Rust 1.95 is the toolchain the project is built and tested with.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p tokengate-companion \
 && install -D target/release/tokengate-companion /out/tokengate-companion

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tokengate-companion /usr/local/bin/tokengate-companion
# Every flag has a TOKENGATE_* variable (README, "The companion"); the default listen
# address is loopback, which nothing outside the container could reach.
ENV TOKENGATE_LISTEN=0.0.0.0:7070
EXPOSE 7070
USER nonroot
ENTRYPOINT ["/usr/local/bin/tokengate-companion"]
