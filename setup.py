"""ddpo_jax: reinforcement-learning fine-tuning of diffusion models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ddpo_jax",
    version="0.1.0",
    description="DDPO and CTRL fine-tuning of diffusion models in JAX/Flax (TPU, GPU, CPU).",
    license="Apache-2.0",
    license_files=["LICENSE"],
    # ddpo_jax.configs (the shipped run configs, `--config=NAME`) is a package: its files install
    # as modules.
    packages=find_packages(include=["ddpo_jax", "ddpo_jax.*"]),
    package_data={
        # the published models' configs (no weights) that `python -m ddpo_jax.plan` compiles from
        "ddpo_jax.models": ["published/*/*.json", "published/*/*/*.json", "published/SOURCES.md"],
        # the GPU topologies `python -m ddpo_jax.plan --topology=h100-8` compiles for
        "ddpo_jax.trainer": ["gpu_targets/*.txtpb"],
    },
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "transformers>=4.40",  # only the (framework-free) CLIP tokenizer is used at run time
        "numpy>=1.26",
        "pillow>=10",
        "scikit-learn>=1.3",  # the built-in digits data set
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "msgpack>=1.0",  # reward-server protocol
        "tenacity>=8.3",  # the reward client's retries (stop_before_delay: 8.3)
        "rapidfuzz>=3.0",  # the OCR reward's edit distance
    ],
    extras_require={
        # PyTorch is a test-only dependency: parity oracles for the model stack.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on two workers (README, .ci/run)
            "torch==2.13.0",
            "diffusers>=0.40",
            "peft>=0.17",  # diffusers' load_lora_weights: the LoRA export's parity oracle
            "wandb>=0.16",  # logging.wandb's offline run (tests/test_logging.py)
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            # CTRL's tfds source is tested offline with tfds.testing.mock_data (no TensorFlow).
            "tensorflow-datasets>=4.9.10",
        ],
        # logging.wandb: Weights & Biases (online, or offline without a network)
        "wandb": ["wandb>=0.16"],
        # CTRL offline data from tensorflow-datasets: array_record data sets are read without
        # TensorFlow; TFRecord-stored ones also need `pip install tensorflow-cpu`.
        "tfds": ["tensorflow-datasets>=4.9.10"],
        # `python -m ddpo_jax.plan --topology=v5e-8`: compiling for TPUs on a machine without
        # one (libtpu's compile-only devices); the version pairs with the installed jax's.
        "tpu-plan": ["jax[tpu]>=0.7,<0.11"],
        # benchmarks/vs_trl.py: TRL's DDPOTrainer (trl 0.23.1 is the last release shipping it).
        "bench": [
            "trl==0.23.1",
            "peft>=0.17",
            "accelerate>=1.4",
            "torch==2.13.0",
            "diffusers>=0.40",
        ],
    },
)
