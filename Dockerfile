# bincount as a bring-your-own SageMaker inference container: `bincount serve` on port 8080.
#
# Build from the repository root (the context needs pyproject.toml, README.md, src/ and conf/):
#   docker build -t bincount-serve .
# Try it with a trained model:
#   docker run --rm -p 8080:8080 -v "$PWD/outputs/RUN/model:/opt/ml/model:ro" bincount-serve
#   curl -s localhost:8080/ping
#   curl -s --data-binary @bin.jpg -H 'Content-Type: image/jpeg' localhost:8080/invocations
# On SageMaker: push the image to ECR and create a Model from it with
#   model.tar.gz = model.onnx + model.pt + model_config.json at its top level (tar -czf model.tar.gz -C outputs/RUN/model .)
# SageMaker starts the container as `docker run IMAGE serve`, unpacks model.tar.gz into /opt/ml/model,
# waits for GET /ping to answer 200 and sends requests to POST /invocations on port 8080.
# Limits and the review threshold can be set on the Model's environment: BINCOUNT_MAX_IMAGE_BYTES,
# BINCOUNT_MAX_PIXELS, BINCOUNT_MAX_INSTANCES, BINCOUNT_REVIEW_THRESHOLD (or the flags of `bincount serve --help`).

FROM python:3.11-slim

# torch from the default index is the CUDA build (runs on CPU and GPU instances); for a smaller
# CPU-only image pass a CPU wheel index: --build-arg TORCH_INDEX_URL=<index>
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BINCOUNT_HOST=0.0.0.0 \
    SM_MODEL_DIR=/opt/ml/model

WORKDIR /opt/bincount
COPY pyproject.toml README.md ./
COPY src ./src
COPY conf ./conf
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[serve]" && rm -rf /opt/bincount/src

EXPOSE 8080
# SageMaker appends "serve": the container runs `bincount serve` (host $BINCOUNT_HOST, model $SM_MODEL_DIR)
ENTRYPOINT ["bincount"]
CMD ["serve"]
