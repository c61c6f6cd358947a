"""Requests/s and latency of the reward server at 1, 10 and 50 concurrent clients (loopback).

    python benchmarks/reward_server_load.py [--clients=1,10,50] [--seconds=5] [--images=16]
        [--size=64] [--repo=DIR]

Starts `python -m ddpo_jax.rewards.server --scorer=brightness --port=0` from `--repo` (default:
this checkout; pass another checkout, e.g. a `git worktree` of an older commit, to compare
versions) and, for each client count, that many threads POST /score requests of `--images`
JPEG images of `--size`² pixels back to back for `--seconds`, each on a new connection (as
`RewardClient` does). Prints one line per client count: requests/s, images/s, and the median /
95th-percentile / max latency in ms. The scorer is trivial, so this measures the server's
request handling (parsing, JPEG decoding, threads), not a model.
"""
import argparse
import os
import select
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(repo: str, clients: int):
  """The server on a free loopback port. Every simulated client connects from 127.0.0.1, and a
  client's next connection can open before the server's thread for its last one has ended, so
  both connection bounds are twice the largest client count (the defaults bound a trainer's
  few sequential connections, not 50 concurrent clients on one address)."""
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "ddpo_jax.rewards.server", "--scorer=brightness",
                           "--host=127.0.0.1", "--port=0",
                           f"--max_connections={2 * clients}",
                           f"--max_connections_per_client={2 * clients}"], cwd=repo, env=env,
                          stdout=subprocess.PIPE, text=True)
  ready, _, _ = select.select([proc.stdout], [], [], 60)
  line = proc.stdout.readline() if ready else ""
  if "listening on " not in line:
    proc.kill()
    raise RuntimeError(f"the server did not start: {line!r}")
  return proc, line.rsplit("listening on ", 1)[1].strip()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clients", default="1,10,50")
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--repo", default=REPO)
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  import msgpack
  from ddpo_jax.rewards.client import encode_jpeg

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
  body = msgpack.packb({"images": [encode_jpeg(im) for im in images],
                        "prompts": ["a prompt"] * args.images}, use_bin_type=True)
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  counts = [int(c) for c in args.clients.split(",")]
  proc, url = _start(os.path.abspath(args.repo), max(counts))
  try:
    for n in counts:
      latencies, failures = [], []
      stop = time.monotonic() + args.seconds

      def client():
        while time.monotonic() < stop:
          t0 = time.monotonic()
          try:
            req = urllib.request.Request(url + "/score", data=body, method="POST")
            with opener.open(req, timeout=60) as resp:
              resp.read()
            latencies.append(time.monotonic() - t0)
          except Exception as e:  # noqa: BLE001 (counted and reported)
            failures.append(f"{type(e).__name__} {getattr(e, 'code', '')}".strip())

      threads = [threading.Thread(target=client) for _ in range(n)]
      t_start = time.monotonic()
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      wall = time.monotonic() - t_start
      lat = np.asarray(latencies) * 1e3
      print(f"clients={n}: {len(lat) / wall:.1f} requests/s, {len(lat) * args.images / wall:.0f} "
            f"images/s, latency ms median {np.median(lat):.1f} p95 {np.percentile(lat, 95):.1f} "
            f"max {lat.max():.1f}; failed {len(failures)}"
            f"{' ' + str(sorted(set(failures))) if failures else ''}", flush=True)
  finally:
    proc.terminate()
    proc.wait(timeout=10)


if __name__ == "__main__":
  main()
