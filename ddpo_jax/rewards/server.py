"""HTTP reward server: hosts a scorer for `ddpo_jax.rewards.client.RewardClient`.

    python -m ddpo_jax.rewards.server --scorer=llava_bertscore \\
        --scorer_kwargs='{"model": "llava-hf/llava-1.5-7b-hf"}' --host=127.0.0.1 --port=8085

`--scorer` is a built-in name (`ddpo_jax.rewards.scorers.BUILTIN`: brightness, fail_on_prompt,
llava_bertscore, ocr, geneval; each a factory called with the --scorer_kwargs JSON object,
default {}; docs/rewards.md shows each hosted) or
`MODULE:ATTR`, a scorer callable; with --scorer_kwargs, `MODULE:ATTR` is instead a factory
called with them. The scorer is built before the server listens; then it prints
"reward server: scorer NAME listening on http://HOST:PORT" on stdout (with --port=0 the port is
the one the system chose).

Protocol: see `ddpo_jax.rewards.client`. Requests are handled in threads; scorer calls are
serialised by a lock (one model, one device). A scorer exception answers HTTP 500 with
{"error", "traceback"} for that request only, and so do rewards of any shape but (B,) for the
B images of a scorer call (a (B/2, 2) array is not flattened into B rewards); a malformed
request answers 400.

Limits, so that one client cannot take the server down (each an argument / flag):
- `max_request_bytes` (512 MiB): a larger Content-Length answers 413 before anything is read;
- `max_image_pixels` (16.8 M, 4096²) per image and `max_request_pixels` (67 M, 64 images of
  1024²) per request, checked from the JPEG headers before any image is decoded: 413 naming the
  limit (a 1 MB JPEG of 8000×8000 would otherwise decode to 192 MB, and took the server from
  166 MB to 1.86 GB resident);
- `read_timeout_s` (30 s) per socket read: a client that declares a body and sends nothing is
  answered 408 and disconnected instead of holding a thread forever;
- `request_deadline_s` (120 s) for the whole request (request line, headers and body, from the
  connection's accept): a client that sends a byte now and then, each within `read_timeout_s`,
  is answered 408 at the deadline and disconnected (64 such connections sending a byte every
  10 s used to hold every slot for as long as they liked);
- `max_connections` (64) connections at once: one more is answered 503 at once;
- `max_connections_per_client` (16) connections at once from one client address (the peer's
  IP): one more from that address is answered 503 at once, so that one slow or hostile client
  cannot take every slot and lock the trainer's client out.
Only the standard library's `http.server` and `msgpack` are used: with these limits it serves
the trainer's few large requests, and an ASGI server would add a dependency for no feature used
here (benchmarks/reward_server_load.py measures requests/s and latency at 1, 10, 50 clients).
"""
from __future__ import annotations

import argparse
import io
import json
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
from PIL import Image

from ddpo_jax.rewards import scorers
from ddpo_jax.rewards.client import CONTENT_TYPE, to_builtin
from ddpo_jax.rewards.plugins import load_plugin

MAX_REQUEST_BYTES = 512 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 64 * 1024 * 1024
READ_TIMEOUT_S = 30.0
REQUEST_DEADLINE_S = 120.0
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_CLIENT = 16


class BadRequest(ValueError):
  """A request that does not follow the protocol (answered with HTTP 400)."""


class TooLarge(ValueError):
  """A request over one of the server's size limits (answered with HTTP 413)."""


class DeadlinePassed(TimeoutError):
  """The request was not received within the server's `request_deadline_s` (HTTP 408)."""


class _DeadlineReader(io.RawIOBase):
  """A connection's bytes: each socket read bounded by `read_timeout_s` seconds and all of
  them by `deadline` (a `time.monotonic()` time). A read past the deadline, or one that times
  out because the deadline came first, raises `DeadlinePassed`; one that times out on
  `read_timeout_s` raises the socket's TimeoutError."""

  def __init__(self, sock: socket.socket, read_timeout_s: float, deadline: float):
    super().__init__()
    self.sock, self.read_timeout_s, self.deadline = sock, read_timeout_s, deadline

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise DeadlinePassed("the request deadline passed")
    self.sock.settimeout(min(self.read_timeout_s, left))
    try:
      return self.sock.recv_into(buffer)
    except TimeoutError:
      if left <= self.read_timeout_s:
        raise DeadlinePassed("the request deadline passed") from None
      raise


def resolve_scorer(spec: str, kwargs: dict | None = None) -> Callable:
  """A scorer from a built-in name or "MODULE:ATTR" (see the module docstring).

  Raises:
    ValueError: an unknown name or malformed spec; ImportError / AttributeError naming `spec`.
  """
  if spec in scorers.BUILTIN:
    return scorers.BUILTIN[spec](**(kwargs or {}))
  if ":" not in spec:
    raise ValueError(f"unknown scorer {spec!r}: use one of {sorted(scorers.BUILTIN)} or "
                     "MODULE:ATTR")
  return load_plugin(spec, kwargs, what="scorer")


def _open_jpeg(data: bytes) -> Image.Image:
  """The JPEG's header read (size known), its pixels not yet decoded. Raises ValueError."""
  try:
    return Image.open(io.BytesIO(data), formats=["JPEG"])
  except Exception as e:
    raise ValueError(f"not a readable JPEG image ({type(e).__name__}: {e})") from e


def _decode(img: Image.Image) -> np.ndarray:
  """An opened JPEG -> (H, W, 3) uint8 RGB (as `client.decode_jpeg`). Raises ValueError."""
  try:
    with img:
      return np.asarray(img.convert("RGB"))
  except Exception as e:
    raise ValueError(f"not a readable JPEG image ({type(e).__name__}: {e})") from e


def _parse_request(body: bytes, max_image_pixels: int = MAX_IMAGE_PIXELS,
                   max_request_pixels: int = MAX_REQUEST_PIXELS) -> tuple[Any, list[str], dict]:
  """(images, prompts, metadata) of a /score body. Raises BadRequest, or TooLarge when an image
  or the request is over its pixel limit (checked from the headers before decoding)."""
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
  opened, total = [], 0
  for i, data in enumerate(images):
    try:
      opened.append(_open_jpeg(data))
    except ValueError as e:
      raise BadRequest(f"image {i}: {e}") from None
    width, height = opened[-1].size
    if width * height > max_image_pixels:
      raise TooLarge(f"image {i} is {width}x{height} = {width * height} pixels, over the limit "
                     f"of {max_image_pixels} per image (--max_image_pixels)")
    total += width * height
  if total > max_request_pixels:
    raise TooLarge(f"the request's {len(images)} images hold {total} pixels, over the limit of "
                   f"{max_request_pixels} per request (--max_request_pixels); send fewer per "
                   "request (the client's batch_size)")
  decoded = []
  for i, img in enumerate(opened):
    try:
      decoded.append(_decode(img))
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
    max_request_bytes, max_image_pixels, max_request_pixels, read_timeout_s (s),
      request_deadline_s (s), max_connections, max_connections_per_client: the limits of the
      module docstring (max_connections_per_client <= max_connections; None: the smaller of
      16 and max_connections).
  """
  daemon_threads = True

  def __init__(self, address, scorer: Callable, name: str = "scorer",
               batch_size: int | None = None, verbose: bool = False,
               max_request_bytes: int = MAX_REQUEST_BYTES,
               max_image_pixels: int = MAX_IMAGE_PIXELS,
               max_request_pixels: int = MAX_REQUEST_PIXELS,
               read_timeout_s: float = READ_TIMEOUT_S,
               request_deadline_s: float = REQUEST_DEADLINE_S,
               max_connections: int = MAX_CONNECTIONS,
               max_connections_per_client: int | None = None):
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_connections_per_client is None:
      max_connections_per_client = min(MAX_CONNECTIONS_PER_CLIENT, max_connections)
    for label, value in (("max_request_bytes", max_request_bytes),
                         ("max_image_pixels", max_image_pixels),
                         ("max_request_pixels", max_request_pixels),
                         ("read_timeout_s", read_timeout_s),
                         ("request_deadline_s", request_deadline_s),
                         ("max_connections", max_connections),
                         ("max_connections_per_client", max_connections_per_client)):
      if not value > 0:
        raise ValueError(f"{label} must be > 0, got {value}")
    if max_connections_per_client > max_connections:
      raise ValueError(f"max_connections_per_client ({max_connections_per_client}) must be <= "
                       f"max_connections ({max_connections}); lower it or raise max_connections")
    self.scorer, self.name, self.batch_size = scorer, name, batch_size
    self.verbose, self.max_request_bytes = verbose, max_request_bytes
    self.max_image_pixels, self.max_request_pixels = max_image_pixels, max_request_pixels
    self.read_timeout_s = float(read_timeout_s)
    self.request_deadline_s = float(request_deadline_s)
    self.max_connections = int(max_connections)
    self.max_connections_per_client = int(max_connections_per_client)
    self.connections = threading.BoundedSemaphore(self.max_connections)
    self.per_client: dict[str, int] = {}  # open connections per client address (peer IP)
    self.per_client_lock = threading.Lock()
    # The listen backlog (socketserver's default is 5): connections beyond it were reset by
    # the kernel (measured: 61 of ~1300 requests of 50 concurrent clients) instead of being
    # served or answered 503.
    self.request_queue_size = self.max_connections
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
      r = np.asarray(r, np.float64)
      if r.shape != (stop - start,):
        raise ValueError(f"scorer {self.name} returned rewards of shape {r.shape} for "
                         f"{stop - start} images; it must return one reward per image, shape "
                         f"({stop - start},)")
      rewards.extend(r.tolist())
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

  def setup(self):
    self.timeout = self.server.read_timeout_s  # writes; reads are bounded by _DeadlineReader
    self.deadline = time.monotonic() + self.server.request_deadline_s
    super().setup()
    self.rfile.close()  # the socket's own reader, replaced by one bounded by the deadline
    self.rfile = io.BufferedReader(
        _DeadlineReader(self.connection, self.server.read_timeout_s, self.deadline))

  def _reject(self, error: str):
    """Answers 503 with `error` after reading the request line and headers (bounded by the
    read timeout and the deadline; the answer needs the request's HTTP version)."""
    self.close_connection = True
    try:
      self.raw_requestline = self.rfile.readline(65537)
      if self.raw_requestline and self.parse_request():
        self._send(503, {"error": error})
    except OSError:  # TimeoutError (and DeadlinePassed) included: nothing to answer
      pass

  def handle(self):
    server, peer = self.server, str(self.client_address[0])
    with server.per_client_lock:
      mine = server.per_client.get(peer, 0)
      if mine < server.max_connections_per_client:
        server.per_client[peer] = mine + 1
    if mine >= server.max_connections_per_client:
      self._reject(f"server busy: {mine} connections already open from {peer}, the limit per "
                   f"client (--max_connections_per_client={server.max_connections_per_client}); "
                   "retry later")
      return
    try:
      if not server.connections.acquire(blocking=False):
        self._reject(f"server busy: {server.max_connections} connections already open "
                     "(--max_connections); retry later")
        return
      try:
        super().handle()
      finally:
        server.connections.release()
    finally:
      with server.per_client_lock:
        server.per_client[peer] -= 1
        if not server.per_client[peer]:
          del server.per_client[peer]

  def _timed_out(self, error: TimeoutError, what: str):
    """Answers 408 naming the limit that `error` (raised reading `what`) hit."""
    self.close_connection = True
    if isinstance(error, DeadlinePassed):
      message = (f"{what} was not received within {self.server.request_deadline_s} s of the "
                 "connection (--request_deadline_s); send it faster, or raise the server's "
                 "--request_deadline_s")
    else:
      message = (f"{what} was not received within {self.server.read_timeout_s} s of the last "
                 "bytes (--read_timeout_s)")
    try:
      self._send(408, {"error": message})
    except OSError:
      pass

  def parse_request(self) -> bool:
    try:
      return super().parse_request()
    except TimeoutError as e:  # the headers (the request line is read, its version known)
      self._timed_out(e, "the request's headers")
      return False

  def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
    if self.server.verbose:
      sys.stderr.write(f"reward server: {self.address_string()} {format % args}\n")

  def _send(self, status: int, payload: dict):
    import msgpack
    self.connection.settimeout(self.server.read_timeout_s)  # reads may have left it shorter
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
    try:
      body = self.rfile.read(length)
    except TimeoutError as e:
      self._timed_out(e, "the request body")
      return
    if len(body) != length:
      self._send(400, {"error": f"malformed request: the body ended after {len(body)} of "
                                f"{length} bytes"})
      return
    try:
      images, prompts, metadata = _parse_request(body, self.server.max_image_pixels,
                                                 self.server.max_request_pixels)
    except TooLarge as e:
      self._send(413, {"error": str(e)})
      return
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
                      help="built-in name (brightness, fail_on_prompt, llava_bertscore, ocr, "
                           "geneval) or MODULE:ATTR")
  parser.add_argument("--scorer_kwargs", default=None,
                      help="JSON object of keyword arguments for the scorer factory")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8085, help="0: any free port")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="max images per scorer call (default: the whole request)")
  parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
  parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                      help="largest image (width x height) accepted; larger: HTTP 413")
  parser.add_argument("--max_request_pixels", type=int, default=MAX_REQUEST_PIXELS,
                      help="most pixels of all images of one request; more: HTTP 413")
  parser.add_argument("--read_timeout_s", type=float, default=READ_TIMEOUT_S,
                      help="seconds a connection may stay silent mid-request; then HTTP 408")
  parser.add_argument("--request_deadline_s", type=float, default=REQUEST_DEADLINE_S,
                      help="seconds for a whole request (line, headers, body) to arrive from "
                           "the connection's accept; then HTTP 408")
  parser.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS,
                      help="connections served at once; one more is answered HTTP 503")
  parser.add_argument("--max_connections_per_client", type=int, default=None,
                      help="connections served at once from one client address (peer IP); one "
                           "more from it is answered HTTP 503 (default: "
                           f"{MAX_CONNECTIONS_PER_CLIENT}, at most --max_connections)")
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
                        batch_size=args.batch_size, verbose=args.verbose,
                        max_image_pixels=args.max_image_pixels,
                        max_request_pixels=args.max_request_pixels,
                        read_timeout_s=args.read_timeout_s,
                        request_deadline_s=args.request_deadline_s,
                        max_connections=args.max_connections,
                        max_connections_per_client=args.max_connections_per_client)

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
