"""ddpo_jax: reinforcement-learning fine-tuning of diffusion models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ddpo_jax",
    version="0.1.0",
    description="DDPO and CTRL fine-tuning of diffusion models in JAX/Flax (TPU, GPU, CPU).",
    packages=find_packages(include=["ddpo_jax", "ddpo_jax.*"]),
    # the published models' configs (no weights) that `python -m ddpo_jax.plan` compiles from
    package_data={"ddpo_jax.models": ["published/*/*.json", "published/*/*/*.json",
                                      "published/SOURCES.md"]},
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
    ],
    extras_require={
        # PyTorch is a test-only dependency: parity oracles for the model stack.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on two workers (README, .ci/run)
            "torch==2.13.0",
            "diffusers>=0.40",
            "peft>=0.17",  # diffusers' load_lora_weights: the LoRA export's parity oracle
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            # CTRL's tfds source is tested offline with tfds.testing.mock_data (no TensorFlow).
            "tensorflow-datasets>=4.9.10",
        ],
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
