# syntax=docker/dockerfile:1
# tokengate-standins (the demo's Tenant Service, Genesys login and app on 127.0.0.1:18081,
# 18082 and 18083) for deploy/docker-compose.yml. Test fixtures only: never deploy it.
# Build from the repository root:
#
#   docker build -f deploy/standins.Dockerfile -t tokengate-standins .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p tokengate-tests --bin tokengate-standins \
 && install -D target/release/tokengate-standins /out/tokengate-standins

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tokengate-standins /usr/local/bin/tokengate-standins
USER nonroot
ENTRYPOINT ["/usr/local/bin/tokengate-standins"]
