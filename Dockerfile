# ptmoe_serve on an NVIDIA GPU: `docker build -t ptmoe-serve .` then
# `docker run --gpus all -p 8000:8000 -v $PWD/adapters:/adapters -e PTMOE_API_KEY=... \
#     -e PTMOE_ADMIN_API_KEY=... ptmoe-serve`
# The container listens on every address, so it refuses to start without an API key unless
# given --allow-unauthenticated (a gateway in front checks callers). Without an admin key it
# generates one into /opt/ptmoe-cache/admin.key (`docker exec <container> cat` it).
FROM python:3.12-slim

# Triton compiles small launchers at run time and needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ptmoe_serve ./ptmoe_serve
RUN pip install --no-cache-dir ".[cuda]"

# The embedded default model, prepared once into the image.
ENV PTMOE_CACHE=/opt/ptmoe-cache
RUN ptmoe-serve prepare-model --cache-dir $PTMOE_CACHE

COPY adapters /adapters
EXPOSE 8000
ENTRYPOINT ["ptmoe-serve", "serve", "--host", "0.0.0.0", "--port", "8000", \
            "--adapters", "/adapters", "--cache-dir", "/opt/ptmoe-cache"]
CMD ["--model", "default"]
