"""Client of the reward server (`ddpo_jax.rewards.server`): host rewards computed over HTTP.

Protocol (msgpack bodies, binary-safe):

  POST /score  {"images": [JPEG bytes, ...], "prompts": [str, ...], "metadata": {...}}
     200 -> {"rewards": [float, ...] (one per image), "info": {name: [...], ...}}
     400 -> {"error": "..."}  malformed request (not retried)
     408 / 413 -> {"error": "..."}  body not sent in time / over a size or pixel limit (not
       retried; the message names the limit)
     500 -> {"error": "...", "traceback": "..."}  the scorer raised (retried)
     503 -> {"error": "..."}  the server has its maximum of connections open, in all or from
       this client's address (retried)
  GET /health -> 200 {"status": "ok", "scorer": NAME}

As the reference (kvablack/ddpo-pytorch `llava_bertscore`): images are JPEG-encoded at quality
80 and sent in batches of 16, each POST with a 120 s timeout, retried on server errors. Unlike
the reference (1000 retries), retries are bounded and end in a `RewardServerError` that names
the server and the last error, every response is validated, a whole call (all its batches and
retries) has a deadline (600 s), and a wait is logged every 30 s (a frozen server used to stall
training for 3 x 120 s without a word).

Retrying is tenacity's (`tenacity.Retrying`: `stop_after_attempt(retries)`, `wait_exponential(
backoff, max=max_backoff)`, i.e. backoff, 2 backoff, 4 backoff, ... before the 2nd, 3rd, 4th try,
and `stop_before_delay` for the part of the call's deadline left to a batch, so a backoff that
would end past the deadline is not slept). tenacity rather than urllib3's `Retry`, because
urllib3 runs the tries inside one `urlopen` call, out of this module's reach: its backoff skips
the pause before the 2nd try (urllib3 2: 0, then 2 x factor, ...), it has no deadline across
tries, and a try could neither be logged while it waits, nor have its timeout cut to what is
left of the deadline, nor be given up when a server drips its answer (each byte within the socket
timeout). With tenacity one try stays one `_open` here. What this module keeps: which failures
are retried (connection errors, timeouts, HTTP 5xx; not 4xx nor an invalid answer), the call's
deadline, the progress lines, batching, and the `RewardServerError` messages.
"""
from __future__ import annotations

import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tenacity
from PIL import Image

JPEG_QUALITY = 80
CONTENT_TYPE = "application/msgpack"
TIMEOUT_S = 120.0
DEADLINE_S = 600.0
PROGRESS_EVERY_S = 30.0
# What a deadline error tells the user to change (the trainer's key, then this class's argument).
DEADLINE_SETTING = "config.reward.server_deadline_s (RewardClient's deadline_s)"


class RewardServerError(RuntimeError):
  """The reward server could not be reached, failed, or answered something invalid."""


# ----------------------------------------------------------------------------------------------
# Encoding shared with the server
# ----------------------------------------------------------------------------------------------

def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  """(H, W, 3) or (H, W, 1) / (H, W) uint8 -> JPEG bytes (PIL, `quality`)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG bytes -> (H, W, 3) uint8 RGB (grayscale JPEGs are converted to RGB).

  Raises:
    ValueError: `data` is not a readable JPEG.
  """
  try:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
      return np.asarray(img.convert("RGB"))
  except Exception as e:
    raise ValueError(f"not a readable JPEG image ({type(e).__name__}: {e})") from e


def to_builtin(obj: Any) -> Any:
  """NumPy arrays/scalars (nested in dicts, lists, tuples) -> Python lists/numbers for msgpack."""
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, Mapping):
    return {str(k): to_builtin(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_builtin(v) for v in obj]
  if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):  # jax.Array, ...
    return np.asarray(obj).tolist()
  return obj


def _slice_metadata(metadata: Mapping[str, Any] | None, start: int, stop: int,
                    total: int) -> dict:
  """Per-sample entries (sequences of length `total`) sliced to [start, stop); others whole."""
  out = {}
  for key, value in (metadata or {}).items():
    if isinstance(value, (np.ndarray, list, tuple)) and np.ndim(value) > 0 and \
        len(value) == total:
      value = value[start:stop]
    out[str(key)] = to_builtin(value)
  return out


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------

class RewardClient:
  """Scores images with a reward server: `client(images, prompts, metadata)`.

  Args:
    url: the server's base URL, e.g. "http://127.0.0.1:8085" (a trailing "/score" is accepted).
    batch_size: images per POST (16, as the reference).
    timeout: seconds for one POST (connect + response), 120 s; a POST that takes longer is a
      failed attempt (retried).
    retries: attempts per batch (>= 1), on connection errors, timeouts and HTTP 5xx; a 4xx or an
      invalid response is not retried.
    backoff: seconds before the 2nd attempt, doubled for each further one, capped at
      `max_backoff`.
    jpeg_quality: JPEG quality of the uploaded images (80, as the reference).
    use_env_proxy: honour http_proxy/no_proxy environment variables (default: connect directly).
    deadline_s: seconds for a whole call (`client(...)` or `score_batch`: all its batches, tries
      and backoffs together), 600 s; past it the call raises `RewardServerError` naming the
      server and the deadline. Each POST's timeout is cut to what is left of it.
    progress_every_s: while waiting for the server, `log` is called every this many seconds of
      the call (30 s) with "waiting for reward server URL: N s, batch i/n, try k/retries ...".
    log: called with each progress line (a str); default `print`.

  Attributes:
    last_attempts: attempts made for the last batch sent (for tests and logging).
  """

  def __init__(self, url: str, batch_size: int = 16, timeout: float = TIMEOUT_S,
               retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
               jpeg_quality: int = JPEG_QUALITY, use_env_proxy: bool = False,
               deadline_s: float = DEADLINE_S, progress_every_s: float = PROGRESS_EVERY_S,
               log: Callable[[str], Any] = print):
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
      raise ValueError(f"RewardClient: url must start with http:// or https://, got {url!r}")
    if batch_size < 1 or retries < 1 or timeout <= 0 or backoff < 0 or max_backoff < 0:
      raise ValueError(f"RewardClient: need batch_size >= 1, retries >= 1, timeout > 0, "
                       f"backoff >= 0 (got {batch_size}, {retries}, {timeout}, {backoff})")
    if not deadline_s > 0 or not progress_every_s > 0:
      raise ValueError(f"RewardClient: need deadline_s > 0 and progress_every_s > 0 (got "
                       f"{deadline_s}, {progress_every_s})")
    url = url.rstrip("/")
    if url.endswith("/score"):
      url = url[:-len("/score")]
    self.url = url
    self.batch_size = int(batch_size)
    self.timeout = float(timeout)
    self.retries = int(retries)
    self.backoff = float(backoff)
    self.max_backoff = float(max_backoff)
    self.jpeg_quality = int(jpeg_quality)
    self.deadline_s = float(deadline_s)
    self.progress_every_s = float(progress_every_s)
    self.log = log
    handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
    self._opener = urllib.request.build_opener(*handlers)
    self.last_attempts = 0

  def __repr__(self):
    return (f"RewardClient({self.url!r}, batch_size={self.batch_size}, timeout={self.timeout}, "
            f"retries={self.retries}, deadline_s={self.deadline_s})")

  # -- HTTP -------------------------------------------------------------------------------------

  def health(self) -> dict:
    """GET /health (one try) -> the decoded answer. Raises RewardServerError if unreachable."""
    import msgpack
    try:
      with self._opener.open(self.url + "/health", timeout=self.timeout) as resp:
        return msgpack.unpackb(resp.read(), raw=False)
    except Exception as e:
      raise RewardServerError(f"reward server at {self.url} is not healthy: "
                              f"{type(e).__name__}: {e}") from e

  def _deadline_error(self, call: "_Call", attempt: int, last_error: str) -> RewardServerError:
    return RewardServerError(
        f"reward server at {self.url} did not finish within the deadline of {self.deadline_s} "
        f"s for the whole call (all batches and tries; at batch {call.batch}/{call.batches}, "
        f"try {attempt}/{self.retries}; last error: {last_error}); if the server is only slow, "
        f"raise {DEADLINE_SETTING}, else check the server")

  def _open(self, request: urllib.request.Request, timeout: float, call: "_Call",
            attempt: int) -> bytes:
    """One POST, its socket timeout `timeout` s, in a daemon thread while this one logs
    progress. Raises what the POST raised, TimeoutError if it has not finished within
    `timeout` s (plus a moment for its own timeout to fire), or the deadline's error."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def post():
      try:
        with self._opener.open(request, timeout=timeout) as resp:
          outcome["body"] = resp.read()
      except BaseException as e:  # noqa: BLE001 (handed to the waiting thread)
        outcome["error"] = e
      finally:
        done.set()
    threading.Thread(target=post, daemon=True, name="RewardClient POST").start()
    give_up = time.monotonic() + timeout + 0.25
    while True:
      now = time.monotonic()
      if now >= call.next_log:
        self.log(f"waiting for reward server {self.url}: {now - call.start:.0f} s, batch "
                 f"{call.batch}/{call.batches}, try {attempt}/{self.retries} (deadline "
                 f"{self.deadline_s:g} s for the whole call)")
        while call.next_log <= now:
          call.next_log += self.progress_every_s
      if done.wait(max(0.0, min(call.next_log, give_up) - now)):
        break
      if time.monotonic() >= give_up:
        if time.monotonic() >= call.end:
          raise self._deadline_error(call, attempt, f"no answer within {timeout:.3g} s")
        raise TimeoutError(f"no answer within {timeout:.3g} s")  # a dripping answer
    if "error" in outcome:
      raise outcome["error"]
    return outcome["body"]

  def _post(self, body: bytes, call: "_Call") -> bytes:
    """POSTs to /score with bounded retries (tenacity) within `call`'s deadline; returns the
    body of a 200 answer."""
    self.last_attempts = 0
    last_error, reachable = "no attempt", False  # reachable: some try got an HTTP answer
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Retryable),
        stop=(tenacity.stop_after_attempt(self.retries)
              | tenacity.stop_before_delay(call.end - time.monotonic())),
        wait=tenacity.wait_exponential(multiplier=self.backoff, max=self.max_backoff))
    try:
      for attempt in retrying:
        with attempt:
          tried = attempt.retry_state.attempt_number - 1
          left = call.end - time.monotonic()
          if left <= 0:
            raise self._deadline_error(call, tried, last_error)
          self.last_attempts = tried + 1
          request = urllib.request.Request(self.url + "/score", data=body, method="POST",
                                           headers={"Content-Type": CONTENT_TYPE})
          cut = left < self.timeout  # this try's timeout is what is left of the deadline
          try:
            return self._open(request, min(self.timeout, left), call, tried + 1)
          except urllib.error.HTTPError as e:
            reachable = True
            message = _error_message(e.read())
            if e.code < 500:
              raise RewardServerError(f"reward server at {self.url} rejected the request "
                                      f"(HTTP {e.code}): {message}") from None
            last_error = f"HTTP {e.code}: {message}"
            raise _Retryable(last_error) from None
          except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                  socket.timeout, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            last_error = f"{type(reason).__name__}: {reason}"
            if cut and isinstance(reason, TimeoutError):
              raise self._deadline_error(call, tried + 1, last_error) from None
            raise _Retryable(last_error) from None
    except tenacity.RetryError as e:  # out of tries, or the next backoff ends past the deadline
      tries = e.last_attempt.attempt_number
      if tries < self.retries or time.monotonic() >= call.end:
        raise self._deadline_error(call, tries, last_error) from None
      what = "failed" if reachable else "is not reachable"
      raise RewardServerError(f"reward server at {self.url} {what} after {self.retries} tries: "
                              f"{last_error}") from None
    raise AssertionError("unreachable: tenacity ends with an answer or an error")

  # -- scoring ----------------------------------------------------------------------------------

  def score_batch(self, images: np.ndarray, prompts: Sequence[str],
                  metadata: Mapping[str, Any] | None = None,
                  call: "_Call | None" = None) -> tuple[np.ndarray, dict]:
    """One POST (with retries) of all of `images` (n, H, W, C) uint8 -> (rewards (n,), info),
    within `call`'s deadline (default: a call of its own, `deadline_s` from now)."""
    import msgpack
    body = msgpack.packb({
        "images": [encode_jpeg(img, self.jpeg_quality) for img in images],
        "prompts": list(prompts),
        "metadata": dict(metadata or {}),
    }, use_bin_type=True)
    call = call or _Call(self, batches=1)
    return self._parse(self._post(body, call), len(images), prompts)

  def _parse(self, data: bytes, n: int, prompts: Sequence[str]) -> tuple[np.ndarray, dict]:
    import msgpack
    bad = f"reward server at {self.url} returned an invalid response"
    try:
      answer = msgpack.unpackb(data, raw=False)
    except Exception as e:
      raise RewardServerError(f"{bad}: not msgpack ({type(e).__name__}: {e}; first bytes "
                              f"{data[:40]!r})") from None
    if not isinstance(answer, dict):
      raise RewardServerError(f"{bad}: expected a map, got {type(answer).__name__}")
    if "error" in answer:
      raise RewardServerError(f"reward server at {self.url} answered an error: "
                              f"{answer['error']}")
    rewards = answer.get("rewards")
    if not isinstance(rewards, (list, tuple)):
      raise RewardServerError(f"{bad}: 'rewards' must be a list, got {type(rewards).__name__}")
    if len(rewards) != n:
      raise RewardServerError(f"{bad}: {len(rewards)} rewards for a batch of {n} images")
    try:
      rewards = np.asarray(rewards, np.float32)
    except (TypeError, ValueError) as e:
      raise RewardServerError(f"{bad}: rewards are not numbers ({e})") from None
    if rewards.shape != (n,):
      raise RewardServerError(f"{bad}: rewards of shape {rewards.shape}, expected ({n},)")
    nonfinite = np.flatnonzero(~np.isfinite(rewards))
    if nonfinite.size:
      shown = [(int(i), prompts[i]) for i in nonfinite[:4]]
      raise RewardServerError(f"reward server at {self.url} returned non-finite rewards "
                              f"{rewards[nonfinite[:4]].tolist()} at (index, prompt) {shown}")
    info = answer.get("info", {})
    if not isinstance(info, dict):
      raise RewardServerError(f"{bad}: 'info' must be a map, got {type(info).__name__}")
    return rewards, info

  def __call__(self, images, prompts: Sequence[str],
               metadata: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict]:
    """Scores uint8 images (B, H, W, C), C in {1, 3}, with their prompts.

    Returns:
      rewards: (B,) float32.
      info: {name: np.ndarray}; per-sample entries (a list of one value per image in every
        batch) are concatenated to (B, ...); other entries are stacked per batch.

    Raises:
      ValueError / TypeError: bad images or prompts.
      RewardServerError: the server is unreachable, keeps failing, answers invalid data, or
        the call is not done within `deadline_s` seconds.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise TypeError(f"RewardClient: images must be uint8 (use rewards.to_uint8), got "
                      f"{images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"RewardClient: images must be (B, H, W, 1 or 3), got {images.shape}")
    if isinstance(prompts, str):
      raise TypeError("RewardClient: prompts must be a list of strings, not one string")
    prompts = [str(p) for p in prompts]
    total = images.shape[0]
    if len(prompts) != total:
      raise ValueError(f"RewardClient: {total} images but {len(prompts)} prompts")
    rewards, infos, sizes = [], [], []
    call = _Call(self, batches=-(-total // self.batch_size))
    for start in range(0, total, self.batch_size):
      stop = min(start + self.batch_size, total)
      call.batch = start // self.batch_size + 1
      r, info = self.score_batch(images[start:stop], prompts[start:stop],
                                 _slice_metadata(metadata, start, stop, total), call)
      rewards.append(r)
      infos.append(info)
      sizes.append(stop - start)
    merged = {}
    for key in {k for info in infos for k in info}:
      values = [info.get(key) for info in infos]
      per_sample = all(isinstance(v, (list, tuple)) and len(v) == n
                       for v, n in zip(values, sizes))
      merged[key] = np.asarray([x for v in values for x in v] if per_sample else values)
    out = np.concatenate(rewards) if rewards else np.zeros((0,), np.float32)
    return out, merged


class _Retryable(Exception):
  """A failed try that is worth another (connection error, timeout, HTTP 5xx); its text is the
  error the final `RewardServerError` names."""


class _Call:
  """One call's clock (`time.monotonic()` seconds): its start, its deadline `end`, when the
  next progress line is due, and the batch (1-based) of `batches` being sent."""

  def __init__(self, client: RewardClient, batches: int):
    self.start = time.monotonic()
    self.end = self.start + client.deadline_s
    self.next_log = self.start + client.progress_every_s
    self.batch, self.batches = 1, batches


def _error_message(data: bytes) -> str:
  """The "error" of a msgpack error answer, else the (truncated) raw body."""
  try:
    import msgpack
    answer = msgpack.unpackb(data, raw=False)
    if isinstance(answer, dict) and "error" in answer:
      return str(answer["error"])
  except Exception:
    pass
  text = data[:300].decode("utf-8", "replace")
  return text + ("..." if len(data) > 300 else "")


def remote_reward(url: str, **kwargs):
  """A HOST reward `fn(images uint8 (B,H,W,C), prompts, metadata) -> (rewards (B,), info)`
  computed by the reward server at `url`; `kwargs` go to `RewardClient`."""
  return RewardClient(url, **kwargs)

