# The agent image of the Kubernetes runtime: Python with spear_nb installed.
#
#   docker build --build-arg PYTHON_VERSION=3.11 -t REGISTRY/spear-nb-agent:0.1.0 .
#   docker push REGISTRY/spear-nb-agent:0.1.0
#
# Use the Python minor version of the notebook that sends the functions: they
# travel with cloudpickle. Add what your functions import in an image built FROM
# this one.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY spear_nb ./spear_nb
RUN pip install . && cd / && rm -rf /src

RUN useradd --create-home --uid 10001 spear
USER 10001
WORKDIR /home/spear

# What a pod runs; the runtime gives the same command explicitly.
CMD ["python", "-m", "spear_nb.agent"]
