r"""The real-size plan table of docs/plan.md: each row is one `python -m ddpo_jax.plan` run (a
config, a topology, overrides) compiled here for its TPU / GPU topology from the published
configs (no weights, no accelerator), one subprocess per row; prints a markdown table.

  python benchmarks/plan_table.py --rows=sd15_lora_v5e8,sd15_full_v5e8 --out=DIR
  python benchmarks/plan_table.py --rows=tiny --out=DIR      # seconds-to-minutes smoke row

Each row's JSON (`--json` of the plan command) and log go to DIR/ROW.json / DIR/ROW.log; a row
whose JSON is already there is read back, not compiled again (`--recompile` to redo it). Needs
libtpu (`pip install -e ".[tpu-plan]"`) for TPU rows, the CUDA plugin for GPU rows. These are
compile-time projections, not measurements.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = "--config.model.dtype=bfloat16"  # the frozen / LoRA-adapted weights in bfloat16
SDXL = ["--config.model.pretrained_path=stabilityai/stable-diffusion-xl-base-1.0",
        "--config.model.resolution=1024"]
# PickScore's CLIP is not on this machine: the term is left out of the sampling program (the
# plan says so); the path only satisfies the config's validation.
PICKSCORE = "--config.reward.pickscore_path=/absent/pickscore"

# name: (description, config, topology, overrides)
ROWS = {
    "tiny": ("digits DDPO, 8 samples, 2 steps (smoke)", "default", "v5e:2x2",
             ["--config.sample.batch_size=8", "--config.sample.num_batches_per_epoch=1",
              "--config.sample.num_steps=2", "--config.train.batch_size=8",
              "--config.train.gradient_accumulation_steps=1"]),
    # the SD configs' default model, CompVis/stable-diffusion-v1-4: SD 1.5's architecture
    "sd15_lora_v5e8": ("SD-1.5 DDPO LoRA, 512², 50 steps, CFG", "sd_compressibility",
                       "v5e-8", [BF16]),
    "sd15_full_v5e8": ("SD-1.5 DDPO full (fp32 master)", "sd_compressibility:full",
                       "v5e-8", []),
    "sdxl_lora_v5e8": ("SDXL DDPO LoRA, 1024²", "sd_compressibility", "v5e-8",
                       [BF16, *SDXL]),
    "sdxl_lora_v5p8": ("SDXL DDPO LoRA, 1024²", "sd_compressibility", "v5p-8",
                       [BF16, *SDXL]),
    "sd35m_grpo_lora_v5p8": ("SD3.5-M Flow-GRPO LoRA, 512²", "sd3_pickscore",
                             "v5p-8", [BF16, PICKSCORE]),
    "sd35m_fast_lora_v5p8": ("SD3.5-M Flow-GRPO-Fast LoRA, 512²",
                             "sd3_fast_pickscore", "v5p-8", [BF16, PICKSCORE]),
    "sd35m_grpo_full_v5p8": ("SD3.5-M Flow-GRPO full (fp32 master)",
                             "sd3_pickscore:full", "v5p-8", [PICKSCORE]),
    "flux_lora_v5p8": ("FLUX.1-dev Flow-GRPO LoRA, 512²", "flux_pickscore", "v5p-8",
                       [BF16, PICKSCORE]),
    "flux_lora_v6e8": ("FLUX.1-dev Flow-GRPO LoRA, 512²", "flux_pickscore", "v6e-8",
                       [BF16, PICKSCORE]),
    "flux_full_fsdp_v5p64": ("FLUX.1-dev Flow-GRPO full, FSDP 8 x data 4 (fp32 master)",
                             "flux_pickscore:full", "v5p-64",
                             [PICKSCORE, "--config.mesh.fsdp=8"]),
    "sd35m_grpo_lora_h100x8": ("SD3.5-M Flow-GRPO LoRA, 512²", "sd3_pickscore",
                               "h100-8", [BF16, PICKSCORE]),
}


def command(row: str, json_path: str, trace_only: bool = False) -> list[str]:
  _, config, topology, overrides = ROWS[row]
  return [sys.executable, "-m", "ddpo_jax.plan", f"--config={config}",
          f"--topology={topology}", f"--json={json_path}", *overrides,
          *(["--trace_only"] if trace_only else [])]


def run_row(row: str, out: str, recompile: bool, trace_only: bool = False) -> dict | None:
  """The row's plan JSON (compiled now unless already in `out`), or None if the plan failed.
  `trace_only`: FLOPs only, kept apart (ROW.trace.json) from the compiled plan."""
  json_path = os.path.join(out, f"{row}{'.trace' if trace_only else ''}.json")
  if os.path.exists(json_path) and not recompile:
    with open(json_path) as f:
      return json.load(f)
  t0 = time.time()
  with open(os.path.join(out, f"{row}.log"), "w") as log:
    rc = subprocess.run(command(row, json_path, trace_only), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}).returncode
  print(f"{row}: exit {rc} after {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
  if rc not in (0, 1) or not os.path.exists(json_path):
    return None
  with open(json_path) as f:
    return json.load(f)


def markdown_row(row: str, plan: dict | None) -> str:
  description, config, topology, overrides = ROWS[row]
  shown = " ".join([f"--config={config}", f"--topology={topology}",
                    *[o for o in overrides if o != PICKSCORE]])
  if plan is None:
    return f"| {description} | {topology} | plan failed (see its log) | | | | `{shown}` |"
  hbm = plan["hbm_bytes_per_device"]
  update = next(p for p in plan["programs"] if p["name"] == "update")
  if plan["fits"] is None:  # traced only
    memory, collectives = "not compiled yet", "–"
  else:
    per_device = max(p["bytes"]["total"] for p in plan["programs"])
    per_chip_gib = per_device * plan["num_devices"] / plan["num_chips"] / 2 ** 30
    memory = (f"{per_chip_gib:.1f} ({per_device / hbm:.0%})"
              + ("" if plan["fits"] else " **does not fit**"))
    collectives = ", ".join(f"{c['kind']} ×{c['count']}" for c in update["collectives"]) or "none"
  return (f"| {description} | {plan['topology']} | {memory} | "
          f"{plan['flops_per_sample'] / 1e12:.2f} T | "
          f"{plan['projected_samples_per_s_per_chip']['0.4']:.3g} | {collectives} | `{shown}` |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default=",".join(r for r in ROWS if r != "tiny"),
                      help=f"comma-separated rows of: {', '.join(ROWS)}")
  parser.add_argument("--out", required=True, help="directory for each row's JSON and log")
  parser.add_argument("--recompile", action="store_true")
  parser.add_argument("--trace_only", action="store_true",
                      help="FLOPs and projections only (no compile; rows' memory: not compiled)")
  args = parser.parse_args(argv)
  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
  os.makedirs(args.out, exist_ok=True)
  print("| run | topology | per-chip memory (GiB, of HBM) | FLOPs per sample | projected "
        "samples/s/chip at 40% MFU | collectives per update | command |")
  print("|---|---|---|---|---|---|---|")
  failed = 0
  for row in rows:
    plan = run_row(row, args.out, args.recompile, args.trace_only)
    failed += plan is None
    print(markdown_row(row, plan), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
