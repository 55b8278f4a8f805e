# The image of k8s/rayjob.yaml: Ray's GPU image (CUDA 12, Python 3.11, user `ray`) with this
# project installed, with every extra of pyproject.toml (tests/test_k8s.py compares them).
#   docker build -t ghcr.io/your-org/vgg-pipeline:0.3.0 . && docker push ghcr.io/your-org/vgg-pipeline:0.3.0
# The Ray version is the one the project is tested with; rayjob.yaml's rayVersion says the same.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/vgg-pipeline
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users vgg vgg
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users stages stages
COPY --chown=ray:users configs configs
COPY --chown=ray:users scripts scripts
# torch, torchvision, nvidia-dali-cuda120, MLflow, ...; Ray is the image's (it satisfies ray>=2.40).
# DALI: NVIDIA documents its wheels on its own index (pypi.nvidia.com)
RUN pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com ".[cluster,dev]"
# The RayJob's runtime env uploads this folder as the job's working_dir: `python pipeline/run.py
# --config configs/imagenet.yaml` runs from it.
