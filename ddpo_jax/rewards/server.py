"""HTTP reward server: hosts a scorer for `ddpo_jax.rewards.client.RewardClient`.

    python -m ddpo_jax.rewards.server --scorer=llava_bertscore \\
        --scorer_kwargs='{"model": "llava-hf/llava-1.5-7b-hf"}' --host=127.0.0.1 --port=8085

`--scorer` is a built-in name (`ddpo_jax.rewards.scorers.BUILTIN`: brightness, fail_on_prompt,
llava_bertscore; each a factory called with the --scorer_kwargs JSON object, default {}) or
`MODULE:ATTR`, a scorer callable; with --scorer_kwargs, `MODULE:ATTR` is instead a factory
called with them. The scorer is built before the server listens; then it prints
"reward server: scorer NAME listening on http://HOST:PORT" on stdout (with --port=0 the port is
the one the system chose).

Protocol: see `ddpo_jax.rewards.client`. Requests are handled in threads; scorer calls are
serialised by a lock (one model, one device). A scorer exception answers HTTP 500 with
{"error", "traceback"} for that request only; a malformed request answers 400. Only the
standard library's `http.server` and `msgpack` are used.
"""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np

from ddpo_jax.rewards.client import CONTENT_TYPE, decode_jpeg, to_builtin

MAX_REQUEST_BYTES = 512 * 2**20


class BadRequest(ValueError):
  """A request that does not follow the protocol (answered with HTTP 400)."""


def resolve_scorer(spec: str, kwargs: dict | None = None) -> Callable:
  """A scorer from a built-in name or "MODULE:ATTR" (see the module docstring).

  Raises:
    ValueError: an unknown name or malformed spec; ImportError / AttributeError naming `spec`.
  """
  from ddpo_jax.rewards import scorers
  if spec in scorers.BUILTIN:
    return scorers.BUILTIN[spec](**(kwargs or {}))
  if ":" not in spec:
    raise ValueError(f"unknown scorer {spec!r}: use one of {sorted(scorers.BUILTIN)} or "
                     "MODULE:ATTR")
  module_name, attr = spec.split(":", 1)
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(f"scorer {spec!r}: cannot import {module_name!r} ({e})") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise AttributeError(f"scorer {spec!r}: {module_name} has no attribute {attr!r}")
    obj = getattr(obj, part)
  if kwargs is not None:
    obj = obj(**kwargs)
  if not callable(obj):
    raise ValueError(f"scorer {spec!r} is not callable")
  return obj


def _parse_request(body: bytes) -> tuple[Any, list[str], dict]:
  import msgpack
  try:
    request = msgpack.unpackb(body, raw=False)
  except Exception as e:
    raise BadRequest(f"body is not msgpack ({type(e).__name__}: {e})") from None
  if not isinstance(request, dict):
    raise BadRequest(f"body must be a map, got {type(request).__name__}")
  images, prompts = request.get("images"), request.get("prompts")
  metadata = request.get("metadata") or {}
  if not isinstance(images, list) or not all(isinstance(i, bytes) for i in images):
    raise BadRequest("'images' must be a list of JPEG byte strings")
  if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
    raise BadRequest("'prompts' must be a list of strings")
  if len(images) != len(prompts):
    raise BadRequest(f"{len(images)} images but {len(prompts)} prompts")
  if not isinstance(metadata, dict):
    raise BadRequest(f"'metadata' must be a map, got {type(metadata).__name__}")
  decoded = []
  for i, data in enumerate(images):
    try:
      decoded.append(decode_jpeg(data))
    except ValueError as e:
      raise BadRequest(f"image {i}: {e}") from None
  if decoded and all(d.shape == decoded[0].shape for d in decoded):
    decoded = np.stack(decoded)
  return decoded, prompts, metadata


def _slice(metadata: dict, start: int, stop: int, total: int) -> dict:
  return {k: v[start:stop] if isinstance(v, list) and len(v) == total else v
          for k, v in metadata.items()}


class RewardServer(ThreadingHTTPServer):
  """A ThreadingHTTPServer scoring POST /score requests with `scorer`.

  Args:
    address: (host, port); port 0 = any free port (see `server_address` after binding).
    scorer: `(images, prompts, metadata) -> (rewards, info)`.
    name: shown by /health and in error messages.
    batch_size: at most this many images per scorer call (None: the whole request).
    verbose: log every request on stderr.
  """
  daemon_threads = True

  def __init__(self, address, scorer: Callable, name: str = "scorer",
               batch_size: int | None = None, verbose: bool = False,
               max_request_bytes: int = MAX_REQUEST_BYTES):
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.scorer, self.name, self.batch_size = scorer, name, batch_size
    self.verbose, self.max_request_bytes = verbose, max_request_bytes
    self.lock = threading.Lock()
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def score(self, images, prompts: list[str], metadata: dict) -> dict:
    """Runs the scorer in chunks of `batch_size`; validates and merges its outputs."""
    n = len(prompts)
    step = self.batch_size or max(n, 1)
    rewards, info = [], {}
    for start in range(0, n, step):
      stop = min(start + step, n)
      with self.lock:
        r, i = self.scorer(images[start:stop], prompts[start:stop],
                           _slice(metadata, start, stop, n))
      r = np.asarray(r, np.float64).reshape(-1).tolist()
      if len(r) != stop - start:
        raise ValueError(f"scorer {self.name} returned {len(r)} rewards for "
                         f"{stop - start} images")
      rewards.extend(r)
      for key, value in dict(i or {}).items():
        value = to_builtin(value)
        if isinstance(value, list) and len(value) == stop - start:
          info.setdefault(str(key), []).extend(value)
        else:
          info.setdefault(str(key), []).append(value)
    return {"rewards": rewards, "info": info}


class _Handler(BaseHTTPRequestHandler):
  server: RewardServer
  protocol_version = "HTTP/1.0"

  def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
    if self.server.verbose:
      sys.stderr.write(f"reward server: {self.address_string()} {format % args}\n")

  def _send(self, status: int, payload: dict):
    import msgpack
    body = msgpack.packb(payload, use_bin_type=True)
    self.send_response(status)
    self.send_header("Content-Type", CONTENT_TYPE)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    if self.path.rstrip("/") == "/health":
      self._send(200, {"status": "ok", "scorer": self.server.name})
    else:
      self._send(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})

  def do_POST(self):
    if self.path.rstrip("/") != "/score":
      self._send(404, {"error": f"no such path {self.path!r}; use POST /score"})
      return
    try:
      length = int(self.headers.get("Content-Length", ""))
    except ValueError:
      self._send(411, {"error": "a Content-Length header is required"})
      return
    if length < 0 or length > self.server.max_request_bytes:
      self._send(413, {"error": f"request of {length} bytes is over the limit of "
                                f"{self.server.max_request_bytes}"})
      return
    body = self.rfile.read(length)
    try:
      images, prompts, metadata = _parse_request(body)
    except BadRequest as e:
      self._send(400, {"error": f"malformed request: {e}"})
      return
    try:
      answer = self.server.score(images, prompts, metadata)
    except Exception as e:  # the scorer failed: answer 500, keep serving
      tb = traceback.format_exc()
      sys.stderr.write(f"reward server: scorer {self.server.name} failed on a batch of "
                       f"{len(prompts)}:\n{tb}")
      sys.stderr.flush()
      self._send(500, {"error": f"scorer {self.server.name} raised {type(e).__name__}: {e}",
                       "traceback": tb})
      return
    self._send(200, answer)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(prog="python -m ddpo_jax.rewards.server",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--scorer", required=True,
                      help="built-in name (brightness, fail_on_prompt, llava_bertscore) or "
                           "MODULE:ATTR")
  parser.add_argument("--scorer_kwargs", default=None,
                      help="JSON object of keyword arguments for the scorer factory")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8085, help="0: any free port")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="max images per scorer call (default: the whole request)")
  parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
  args = parser.parse_args(argv)
  kwargs = None
  if args.scorer_kwargs is not None:
    try:
      kwargs = json.loads(args.scorer_kwargs)
    except json.JSONDecodeError as e:
      parser.error(f"--scorer_kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
      parser.error("--scorer_kwargs must be a JSON object")
  scorer = resolve_scorer(args.scorer, kwargs)
  server = RewardServer((args.host, args.port), scorer, name=args.scorer,
                        batch_size=args.batch_size, verbose=args.verbose)

  def stop(signum, frame):
    del signum, frame
    threading.Thread(target=server.shutdown, daemon=True).start()
  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  print(f"reward server: scorer {args.scorer} listening on {server.url}", flush=True)
  try:
    server.serve_forever(poll_interval=0.2)
  finally:
    server.server_close()


if __name__ == "__main__":
  main()
