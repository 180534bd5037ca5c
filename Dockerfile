# syntax=docker/dockerfile:1
# Switchboard's image: `switchboard` (operator with the REST API, and the CLI) and
# `switchboard-node` (the SIP node), as the Helm chart in charts/switchboard runs them.
#
#   docker build -t ghcr.io/switchboard-dev/switchboard:0.1.0 .
#
# The kernel RTP forwarding program (sip-node/bpf/relay.bpf.c) is compiled by clang in the
# build stage and embedded in switchboard-node; the build fails if it came out empty.

ARG RUST_VERSION=1.90

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# clang -target bpf and the kernel/libc headers relay.bpf.c includes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libc6-dev linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
COPY model model
COPY operator operator
COPY api api
COPY sip-node sip-node
COPY migrations migrations
COPY crds crds
COPY examples examples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchboard --bin switchboard-node \
 && if ! find target/release/build -path '*switchboard-node-*/out/relay.bpf.o' -size +0 | grep -q .; then \
      echo "the eBPF object is empty: clang -target bpf failed (see the build's warnings)" >&2; exit 1; \
    fi \
 && install -D -m 0755 target/release/switchboard target/release/switchboard-node -t /out/

# glibc, libgcc, CA certificates and a nonroot user (65532), nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/switchboard /out/switchboard-node /usr/local/bin/
# The operator and, by default, the node run as this user. With kernel RTP forwarding the
# chart runs the node as root with every capability dropped but BPF and NET_ADMIN.
USER 65532:65532
EXPOSE 5060/udp 5060/tcp 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/switchboard"]
CMD ["operator"]
