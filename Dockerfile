# lorafs in a slim image (docs/DEPLOY.md, "Docker"):
#   docker build -t lorafs .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
#       -v /models:/models:ro lorafs inspect /models/base --adapter /models/lora
# Not built here (no Docker engine where lorafs is developed); its build command is the one
# scripts/test.sh runs.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the versions of Cargo.lock, as tested. The kernels are chosen at run time
# (AVX-512, AVX2, NEON, scalar), so one build runs on any CPU of the architecture.
RUN cargo build --release --locked && install -m 0755 target/release/lorafs /usr/local/bin/lorafs

FROM debian:bookworm-slim
# lorafs links only glibc (libc, libm, libgcc_s: `ldd target/release/lorafs`), and mounts
# with mount(2) itself as root, so it needs no libfuse. fusermount3 (package fuse3) is
# only for mounting as a user other than root; add it if the container runs as one.
COPY --from=build /usr/local/bin/lorafs /usr/local/bin/lorafs
# mount(8)'s helper, for `mount -t lorafs` inside the container.
RUN ln -s /usr/local/bin/lorafs /sbin/mount.lorafs
ENTRYPOINT ["lorafs"]
CMD ["--help"]
