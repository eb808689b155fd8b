# Kindling's container images. Build with podman/buildah or Docker BuildKit
# (cache mounts; unused stages are skipped).
#
#   podman build --format docker -t kindling .                       # cpu (default)
#   podman build --format docker --target cpu-prebuilt -t kindling .  # from .container/cpu/
#   podman build --format docker --target cuda -t kindling:cuda .
#   podman build --format docker --target cuda-prebuilt -t kindling:cuda .
#
# Targets:
#   cpu            compiles the workspace (release) and serves on the CPU
#   cpu-prebuilt   the same image from kindling and random-pipeline binaries
#                  staged in .container/cpu/ (scripts/container-smoke.sh does)
#   cuda           compiles with --features cuda against CUDA 13.0 from
#                  NVIDIA's wheels (scripts/build-cuda.sh) and carries the
#                  CUDA libraries the binary opens (cudart, cuBLAS, cuBLASLt,
#                  cuRAND, NVRTC); the driver comes from the host (NVIDIA
#                  Container Toolkit). Without a GPU it serves on the CPU.
#   cuda-prebuilt  the same from .container/cuda/bin (kindling,
#                  random-pipeline) and .container/cuda/lib (the libraries)
#
# Build arguments:
#   BUILDER_IMAGE  Rust toolchain image (Debian bookworm based)
#   RUNTIME_IMAGE  base of the run stages (Debian bookworm based)
#   DEMO_FETCH     1 (default): python3 and pip for KINDLING_FETCH_DEMO=1
#                  (about 45 MB); 0: leave them out
#   CUDA_COMPUTE_CAP  GPU architecture of the CUDA kernels (90: H100/H200)
#   VERSION, REVISION  image labels
#
# Running (the store is a volume; the root file system may be read-only):
#   podman run -d -p 8080:8080 -e KINDLING_API_KEY=KEY1,KEY2 \
#       -e KINDLING_FETCH_DEMO=1 -v kindling-models:/models \
#       --read-only --tmpfs /tmp --stop-timeout 40 kindling
# Beyond loopback the daemon refuses to start without an API key
# (KINDLING_API_KEY, comma-separated, or a keys file), unless given
# --insecure-public as an argument. No key is built into the image. SIGTERM
# drains in-flight requests for up to server.shutdown_timeout (30s), so give
# the runtime a longer stop timeout. GPUs: --device nvidia.com/gpu=all (CDI)
# or docker run --gpus all.

ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
# What every run image shares: tini, the user, config, entrypoint, probes.
FROM ${RUNTIME_IMAGE} AS runtime-base
ARG RUNTIME_IMAGE
ARG DEMO_FETCH=1
ARG VERSION=0.1.0
ARG REVISION=unknown
RUN set -eux; \
    packages=tini; \
    if [ "$DEMO_FETCH" = 1 ]; then \
        packages="$packages ca-certificates python3-minimal libpython3-stdlib python3-pip-whl"; \
    fi; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    if [ "$DEMO_FETCH" = 1 ]; then python3 -c 'import shutil, ssl, zipfile'; fi; \
    groupadd --gid 10001 kindling; \
    useradd --uid 10001 --gid 10001 --home-dir /models --no-create-home --no-log-init \
        --shell /usr/sbin/nologin kindling; \
    mkdir -p /models /etc/kindling; \
    chown 10001:10001 /models
COPY deploy/container/kindling.toml /etc/kindling/kindling.toml
COPY configs/models/ /etc/kindling/models/
COPY deploy/container/entrypoint.sh /usr/local/bin/kindling-entrypoint
COPY deploy/container/healthcheck.sh /usr/local/bin/kindling-healthcheck
COPY scripts/fetch-models.sh /usr/local/share/kindling/scripts/fetch-models.sh
LABEL org.opencontainers.image.title="kindling" \
      org.opencontainers.image.description="Self-hosted OpenAI-compatible model server: chat, completions, embeddings and images" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
# The port the daemon listens on (on all interfaces) and the probe checks.
ENV PORT=8080
WORKDIR /models
VOLUME /models
EXPOSE 8080
STOPSIGNAL SIGTERM
# The first start may fetch the demo models: give it time before counting.
HEALTHCHECK --interval=30s --timeout=10s --start-period=5m --retries=3 \
    CMD ["/usr/local/bin/kindling-healthcheck"]
USER 10001:10001
# tini -g: signals go to the whole process group (the daemon, or a fetch).
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/kindling-entrypoint"]
CMD []

# What the CUDA run images add: the library path, the GPUs in the config,
# the variables the NVIDIA container runtime reads.
FROM runtime-base AS cuda-base
USER root
RUN printf '\n# GPUs: every device the driver reports (CUDA image).\n[devices.auto]\nbudget = "90%%"\n' \
        >>/etc/kindling/kindling.toml
USER 10001:10001
LABEL org.opencontainers.image.description="Self-hosted OpenAI-compatible model server (CUDA 13): chat, completions, embeddings and images"
ENV LD_LIBRARY_PATH=/usr/local/lib/kindling \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------
# Images from binaries built outside (scripts/container-smoke.sh stages them).
FROM runtime-base AS cpu-prebuilt
COPY .container/cpu/kindling .container/cpu/random-pipeline /usr/local/bin/

FROM cuda-base AS cuda-prebuilt
COPY .container/cuda/bin/ /usr/local/bin/
COPY .container/cuda/lib/ /usr/local/lib/kindling/

# ---------------------------------------------------------------------------
# CUDA build: the toolkit from NVIDIA's wheels and the patched cudarc, as
# scripts/build-cuda.sh does on a host (no GPU needed).
FROM ${BUILDER_IMAGE} AS build-cuda
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip patch; \
    rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo/ .cargo/
COPY src/ src/
COPY models/ models/
COPY kernels/ kernels/
COPY scripts/cuda-toolkit.sh scripts/build-cuda.sh scripts/
COPY scripts/cuda/ scripts/cuda/
ARG CUDA_COMPUTE_CAP=90
RUN --mount=type=cache,id=kindling-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=kindling-target-cuda,target=/src/target \
    --mount=type=cache,id=kindling-pip,target=/root/.cache/pip \
    set -eux; \
    KINDLING_CUDA_DIR=/opt/cuda CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP" scripts/build-cuda.sh; \
    mkdir -p /out/bin /out/lib; \
    strip --strip-debug -o /out/bin/kindling target/release/kindling; \
    strip --strip-all -o /out/bin/random-pipeline target/release/random-pipeline; \
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 \
               libnvrtc.so.13 libnvrtc-builtins.so.13.0; do \
        cp -L "/opt/cuda/root/lib64/$lib" /out/lib/; \
    done

FROM cuda-base AS cuda
COPY --from=build-cuda /out/bin/ /usr/local/bin/
COPY --from=build-cuda /out/lib/ /usr/local/lib/kindling/

# ---------------------------------------------------------------------------
# CPU build. Symbols stay in the daemon (named frames in backtraces); the
# line tables go (191 MB -> 30 MB).
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo/ .cargo/
COPY src/ src/
COPY models/ models/
COPY kernels/ kernels/
RUN --mount=type=cache,id=kindling-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=kindling-target-cpu,target=/src/target \
    set -eux; \
    cargo build --release --locked --workspace --bins; \
    mkdir -p /out; \
    strip --strip-debug -o /out/kindling target/release/kindling; \
    strip --strip-all -o /out/random-pipeline target/release/random-pipeline

# The default target: last.
FROM runtime-base AS cpu
COPY --from=build /out/ /usr/local/bin/
