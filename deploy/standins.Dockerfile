# syntax=docker/dockerfile:1
# tokengate-standins (the demo's Tenant Service, Genesys login and app on 127.0.0.1:18081,
# 18082 and 18083) for deploy/docker-compose.yml. Test fixtures only: never deploy it.
# Build from the repository root:
#
#   docker build -f deploy/standins.Dockerfile -t tokengate-standins .
#
# BUILDER_IMAGE, RUNTIME_IMAGE and PREBUILT as in deploy/companion.Dockerfile (PREBUILT:
# a folder holding tokengate-standins and tokengate-probe).
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
ARG PREBUILT=
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ -n "$PREBUILT" ]; then \
      install -D -m 0755 -t /out "$PREBUILT/tokengate-standins" "$PREBUILT/tokengate-probe"; \
    else \
      cargo build --release -p tokengate-tests --bin tokengate-standins -p tokengate-probe \
      && install -D -m 0755 -t /out target/release/tokengate-standins target/release/tokengate-probe; \
    fi

FROM ${RUNTIME_IMAGE}
# tokengate-probe reads the stand-ins' call counters (GET /_standin/calls) for the tests.
COPY --from=build /out/tokengate-standins /out/tokengate-probe /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tokengate-standins"]
