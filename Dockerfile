# Multi-stage build: compile in the Rust image, run on distroless (glibc, no shell, non-root).
#   docker build -t payload-gateway .
#   docker run --rm -p 7233:7233 -v $PWD/config.toml:/etc/payload-gateway/config.toml:ro payload-gateway
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p payload-gateway \
 && install -D target/release/payload-gateway /out/payload-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/payload-gateway /usr/local/bin/payload-gateway
# Listeners must bind 0.0.0.0 inside a container: set them in the config file or with
# PGW__PROXY__LISTEN=0.0.0.0:7233 and friends.
EXPOSE 7233 8081 9464
USER nonroot
ENTRYPOINT ["/usr/local/bin/payload-gateway"]
CMD ["--config", "/etc/payload-gateway/config.toml"]
