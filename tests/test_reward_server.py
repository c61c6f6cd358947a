"""Reward server (a real subprocess on 127.0.0.1) and client: scores, errors, retries, validation.

Loopback only; every server is stopped by its fixture. Retries use millisecond backoffs.
"""
import contextlib
import http.client
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import json
import types

import msgpack
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO
from ddpo_jax import config_schema
from ddpo_jax.rewards import (check_remote_terms, make_rewards, remote_url, client as C,
                              scorers as S, server as srv)
from ddpo_jax.trainer import checkpoints

TRIGGER = "BOOM"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _start_server(log_path, *args, timeout=60.0):
  """Starts `python -m ddpo_jax.rewards.server --port=0 ARGS`; returns (process, url)."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  log = open(log_path, "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "ddpo_jax.rewards.server", "--host=127.0.0.1", "--port=0", *args],
      stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
  log.close()
  deadline = time.monotonic() + timeout
  line = ""
  while time.monotonic() < deadline:
    ready, _, _ = select.select([proc.stdout], [], [], 0.2)
    if ready:
      line = proc.stdout.readline()
      break
    if proc.poll() is not None:
      break
  if "listening on " not in line:
    _stop(proc)
    with open(log_path) as f:
      raise RuntimeError(f"reward server did not start ({line!r}):\n{f.read()[-3000:]}")
  url = line.rsplit("listening on ", 1)[1].strip()
  while time.monotonic() < deadline:  # the socket is bound before the line is printed
    try:
      with _NO_PROXY.open(url + "/health", timeout=2) as resp:
        assert msgpack.unpackb(resp.read())["status"] == "ok"
        return proc, url
    except (urllib.error.URLError, ConnectionError):
      time.sleep(0.05)
  _stop(proc)
  raise RuntimeError("reward server never became healthy")


def _stop(proc):
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=10)
  proc.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """fail_on_prompt (brightness unless a prompt is BOOM), at most 3 images per scorer call."""
  log = tmp_path_factory.mktemp("server") / "server.log"
  proc, url = _start_server(log, "--scorer=fail_on_prompt",
                            '--scorer_kwargs={"trigger": "%s"}' % TRIGGER, "--batch_size=3")
  try:
    yield url
  finally:
    _stop(proc)
  assert proc.returncode == 0, log.read_text()  # SIGTERM -> clean shutdown


def _images(n=5, h=24, w=32, c=3, seed=0):
  rng = np.random.RandomState(seed)
  base = rng.randint(0, 256, (n, 1, 1, c))  # different mean brightness per image
  return np.clip(base + rng.randint(-40, 40, (n, h, w, c)), 0, 255).astype(np.uint8)


def _post_raw(url, body, path="/score"):
  req = urllib.request.Request(url + path, data=body, method="POST")
  try:
    with _NO_PROXY.open(req, timeout=10) as resp:
      return resp.status, msgpack.unpackb(resp.read())
  except urllib.error.HTTPError as e:
    return e.code, msgpack.unpackb(e.read())


# ------------------------------------------------------------------------------------------
# A real server process
# ------------------------------------------------------------------------------------------


def test_scores_equal_local_scorer_on_decoded_jpegs(server):
  images = _images(7)
  prompts = [f"prompt {i}" + "!" * i for i in range(7)]
  client = C.RewardClient(server, batch_size=2, timeout=10)
  rewards, info = client(images, prompts, {"step": np.arange(7), "epoch": 3})
  assert rewards.shape == (7,) and rewards.dtype == np.float32
  decoded = np.stack([C.decode_jpeg(C.encode_jpeg(im, 80)) for im in images])
  want, want_info = S.brightness(decoded, prompts, {})
  np.testing.assert_array_equal(rewards, np.asarray(want, np.float32))
  np.testing.assert_array_equal(info["prompt_length"], want_info["prompt_length"])
  assert np.abs(rewards - images.mean((1, 2, 3)) / 255).max() < 0.02  # JPEG q80 is close
  assert client.last_attempts == 1
  # Grayscale images are sent as grayscale JPEGs and scored as RGB.
  gray = _images(3, c=1, seed=1)
  r_gray, _ = client(gray, ["a", "b", "c"])
  want_gray, _ = S.brightness(np.stack([C.decode_jpeg(C.encode_jpeg(g)) for g in gray]),
                              ["a", "b", "c"], {})
  np.testing.assert_array_equal(r_gray, np.asarray(want_gray, np.float32))
  # The host reward function (trainer convention) and an empty batch (no request).
  fn = C.remote_reward(server, batch_size=16, timeout=10)
  r2, _ = fn(images, prompts, {})
  np.testing.assert_array_equal(r2, rewards)
  r0, info0 = fn(images[:0], [], {})
  assert r0.shape == (0,) and info0 == {}


def test_scorer_exception_is_500_and_server_keeps_serving(server):
  client = C.RewardClient(server, batch_size=8, timeout=10, retries=2, backoff=0.01)
  prompts = ["ok"] * 4 + [TRIGGER]
  with pytest.raises(C.RewardServerError,
                     match=rf"reward server at {server} failed after 2 tries: HTTP 500: "
                           rf"scorer fail_on_prompt raised RuntimeError: .*'{TRIGGER}'"):
    client(_images(5), prompts)
  assert client.last_attempts == 2
  status, answer = _post_raw(server, msgpack.packb(
      {"images": [C.encode_jpeg(im) for im in _images(2)], "prompts": ["x", TRIGGER]}))
  assert status == 500 and "RuntimeError" in answer["error"] and "Traceback" in \
      answer["traceback"]
  rewards, _ = client(_images(5), ["ok"] * 5)  # still serving
  assert rewards.shape == (5,) and client.last_attempts == 1


def test_malformed_requests_are_400(server):
  jpeg = C.encode_jpeg(_images(1)[0])
  cases = [
      (b"\xc1 not msgpack", "not msgpack"),
      (msgpack.packb([1, 2]), "must be a map"),
      (msgpack.packb({"images": [jpeg], "prompts": ["a", "b"]}), "1 images but 2 prompts"),
      (msgpack.packb({"images": ["str"], "prompts": ["a"]}), "JPEG byte strings"),
      (msgpack.packb({"images": [jpeg], "prompts": [3]}), "list of strings"),
      (msgpack.packb({"images": [b"\xff\xd8junk"], "prompts": ["a"]}), "image 0: not a readable"),
      (msgpack.packb({"images": [jpeg], "prompts": ["a"], "metadata": [1]}), "'metadata'"),
  ]
  for body, message in cases:
    status, answer = _post_raw(server, body)
    assert status == 400 and "malformed request" in answer["error"], (message, answer)
    assert message in answer["error"], (message, answer)
  assert _post_raw(server, b"", path="/nope")[0] == 404
  with _NO_PROXY.open(server + "/health", timeout=5) as resp:
    assert resp.status == 200 and msgpack.unpackb(resp.read())["scorer"] == "fail_on_prompt"


def test_client_bad_inputs(server):
  client = C.RewardClient(server, timeout=10)
  with pytest.raises(TypeError, match="uint8"):
    client(_images(2).astype(np.float32), ["a", "b"])
  with pytest.raises(ValueError, match=r"\(B, H, W, 1 or 3\)"):
    client(_images(2)[0], ["a", "b"])
  with pytest.raises(ValueError, match="2 images but 3 prompts"):
    client(_images(2), ["a", "b", "c"])
  with pytest.raises(TypeError, match="list of strings"):
    client(_images(1), "a")
  for kwargs in ({"url": "127.0.0.1:1"}, {"url": server, "retries": 0},
                 {"url": server, "batch_size": 0}):
    with pytest.raises(ValueError):
      C.RewardClient(**kwargs)


def test_server_bad_scorer_exits_with_message(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  for args, message in ((["--scorer=nope"], "unknown scorer 'nope'"),
                        (["--scorer=no_such_module_x:f"], "cannot import 'no_such_module_x'"),
                        (["--scorer=brightness", "--scorer_kwargs=[1]"], "JSON object")):
    out = subprocess.run([sys.executable, "-m", "ddpo_jax.rewards.server", "--port=0", *args],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
                         stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_resolve_scorer():
  assert srv.resolve_scorer("ddpo_jax.rewards.scorers:brightness") is S.brightness
  fail = srv.resolve_scorer("ddpo_jax.rewards.scorers:make_fail_on_prompt", {"trigger": "t"})
  with pytest.raises(RuntimeError, match="'t'"):
    fail(_images(1), ["t"], {})
  with pytest.raises(AttributeError, match="has no attribute 'nope'"):
    srv.resolve_scorer("ddpo_jax.rewards.scorers:nope")


# ------------------------------------------------------------------------------------------
# Remote terms of a config: "remote" on reward.server_url, "remote_NAME" on server_urls.NAME
# (two named terms on two servers: tests/test_reward_plugins.py)
# ------------------------------------------------------------------------------------------
NO_TASK = types.SimpleNamespace(rewards={})


def _reward_config(weights, server_urls=None, **reward):
  config = config_schema.new_config("ddpo", "sd")
  config.reward.weights = weights
  if server_urls is not None:
    config.reward.server_urls = server_urls
  for key, value in reward.items():
    config.reward[key] = value
  config_schema.validate(config)
  return config


def test_the_plain_remote_term_keeps_reward_server_url(server):
  config = _reward_config({"remote": 2.0}, server_url=server)
  [(weight, term)] = make_rewards(config, NO_TASK)
  assert (weight, term.name, term.on_device, term.fn.url) == (2.0, "remote", False, server)
  images, prompts = _images(3), ["a", "bb", "ccc"]
  rewards, info = term.fn(images, prompts, {})
  decoded = np.stack([C.decode_jpeg(C.encode_jpeg(im)) for im in images])
  np.testing.assert_array_equal(rewards, np.float32(S.brightness(decoded, prompts, {})[0]))
  assert info["prompt_length"].tolist() == [1, 2, 3]
  # server_urls plays no part in "remote", and a named term may share a server with it.
  config = _reward_config({"remote": 1.0, "remote_same": 1.0}, {"same": server, "x": ""},
                          server_url=server)
  assert check_remote_terms(config) == {"remote": server, "remote_same": server}


def test_a_named_remote_term_without_a_url_is_refused_naming_the_key():
  cases = [
      ({"remote_ocr": 1.0}, {}, r"reward term 'remote_ocr' has no reward server: "
       r"config.reward.server_urls lacks 'ocr' \(it names \[\]\)\. Add it in the config file"),
      ({"remote_ocr": 1.0}, {"geneval": "http://h:1"}, r"lacks 'ocr' \(it names \['geneval'\]\)"),
      ({"remote_ocr": 1.0}, {"ocr": ""}, "reward term 'remote_ocr' has no reward server: "
       "config.reward.server_urls.ocr is ''; set it .* --config.reward.server_urls.ocr="
       "http://HOST:PORT"),
      ({"remote_ocr": 1.0}, {"ocr": "h:1"}, "reward term 'remote_ocr': config.reward."
       "server_urls.ocr='h:1' must be a URL starting with http:// or https://"),
      ({"remote_": 1.0}, {}, "reward term 'remote_' is not a remote term: name one 'remote'"),
  ]
  for weights, urls, message in cases:
    config = _reward_config(weights, urls)
    with pytest.raises(ValueError, match=message):
      check_remote_terms(config)
    with pytest.raises(ValueError, match=message):
      make_rewards(config, NO_TASK)
  # A metric-only term is checked too; every URL before any term is built (the PickScore
  # directory below does not exist: building that term would fail differently).
  config = _reward_config({"pickscore": 1.0}, {}, metrics=("remote_geneval",),
                          pickscore_path="/nonexistent/PickScore")
  with pytest.raises(ValueError, match="'remote_geneval' has no reward server"):
    make_rewards(config, NO_TASK)
  with pytest.raises(ValueError, match="config.reward.server_url='ftp://x' must be a URL"):
    remote_url("remote", _reward_config({"remote": 1.0}, server_url="ftp://x").reward)
  # A task's own reward of that name is not a remote term.
  assert check_remote_terms(_reward_config({"remote_task": 1.0}), ("remote_task",)) == {}


def test_server_urls_in_saved_configs_and_on_the_command_line():
  """An older checkpoint's config (no reward.server_urls) reads it as {} and resumes without
  a change; a config's JSON (a checkpoint's) keeps named terms; the command line sets a
  listed server's URL and a named term's weight."""
  old = json.loads(config_schema.new_config("ddpo", "sd").to_json())
  del old["reward"]["server_urls"]
  completed = config_schema.complete(old)
  config_schema.validate(completed)
  assert dict(completed.reward.server_urls) == {}
  assert checkpoints.config_changes(json.dumps(old), config_schema.new_config("ddpo", "sd")) == {}

  config = _reward_config({"remote_ocr": 0.5, "pickscore": 1.0}, {"ocr": "http://a:1"})
  back = config_schema.complete(json.loads(config.to_json()))
  config_schema.validate(back)
  assert dict(back.reward.weights) == {"remote_ocr": 0.5, "pickscore": 1.0}
  assert check_remote_terms(back) == {"remote_ocr": "http://a:1"}
  assert checkpoints.config_changes(config.to_json(), back) == {}
  moved = _reward_config({"remote_ocr": 0.5, "pickscore": 1.0}, {"ocr": "http://b:2"})
  assert checkpoints.config_changes(config.to_json(), moved) == {
      "reward.server_urls.ocr": ("http://a:1", "http://b:2")}

  def parse(*overrides):
    argv = ["main", f"--config={REPO}/ddpo_jax/configs/sd3_multi_reward.py:runlocal", *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv,
                                             lock_config=True)  # as ddpo_jax/main.py
    values(argv)
    config_schema.validate(holder.value)
    return holder.value
  parsed = parse("--config.reward.weights.remote_ocr=0.2",
                 "--config.reward.server_urls.ocr=http://ocr:8085",
                 "--config.reward.server_urls.geneval=http://geneval:8086")
  assert dict(parsed.reward.weights) == {"pickscore": 1.0, "remote_ocr": 0.2,
                                         "remote_geneval": 0.5}
  assert check_remote_terms(parsed) == {"remote_ocr": "http://ocr:8085",
                                        "remote_geneval": "http://geneval:8086"}
  # The recipe without its URLs is refused, naming the key.
  with pytest.raises(ValueError, match=r"config.reward.server_urls.geneval is ''"):
    check_remote_terms(parse("--config.reward.server_urls.ocr=http://ocr:8085"))


# ------------------------------------------------------------------------------------------
# Retries and response validation against scripted in-process servers
# ------------------------------------------------------------------------------------------


class _Scripted(BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass

  def do_POST(self):
    body = self.rfile.read(int(self.headers["Content-Length"]))
    request = msgpack.unpackb(body)
    self.server.requests.append(request)
    status, payload = self.server.answer(request)
    self.send_response(status)
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    self.wfile.write(payload)


@pytest.fixture
def scripted():
  """An in-process server answering `server.answer(request) -> (status, body bytes)`."""
  httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
  httpd.daemon_threads = True
  httpd.requests = []
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _ok(request, rewards=None, **extra):
  n = len(request["images"])
  return 200, msgpack.packb({"rewards": list(range(n)) if rewards is None else rewards, **extra})


def test_retries_on_500_then_fails_clearly(scripted):
  httpd, url = scripted
  httpd.answer = lambda req: (500, msgpack.packb({"error": "GPU on fire"}))
  client = C.RewardClient(url, retries=3, backoff=0.01, timeout=5)
  t0 = time.monotonic()
  with pytest.raises(C.RewardServerError,
                     match=rf"reward server at {url} failed after 3 tries: HTTP 500: GPU on fire"):
    client(_images(2), ["a", "b"])
  assert len(httpd.requests) == 3 and client.last_attempts == 3
  assert time.monotonic() - t0 < 3  # backoff 0.01 + 0.02
  # A transient failure is retried and then succeeds.
  httpd.requests.clear()
  httpd.answer = lambda req: (503, b"busy") if len(httpd.requests) < 3 else _ok(req)
  rewards, _ = client(_images(2), ["a", "b"])
  np.testing.assert_array_equal(rewards, [0, 1])
  assert client.last_attempts == 3
  # 4xx is not retried.
  httpd.requests.clear()
  httpd.answer = lambda req: (400, msgpack.packb({"error": "malformed request: x"}))
  with pytest.raises(C.RewardServerError, match=r"rejected the request \(HTTP 400\): malformed"):
    client(_images(1), ["a"])
  assert len(httpd.requests) == 1


def test_backoff_doubles_from_the_first_retry_and_is_not_slept_past_the_deadline(scripted):
  """backoff, then 2 x backoff between tries (urllib3's Retry would skip the first pause); a
  pause that would end past the call's deadline ends the call at once."""
  httpd, url = scripted
  times = []
  httpd.answer = lambda req: times.append(time.monotonic()) or (500, b"down")
  client = C.RewardClient(url, retries=3, backoff=0.2, timeout=5)
  with pytest.raises(C.RewardServerError, match="failed after 3 tries: HTTP 500: down"):
    client(_images(1, h=8, w=8), ["a"])
  gaps = np.diff(times)
  assert len(times) == 3 and 0.18 < gaps[0] < 1.0 and 0.38 < gaps[1] < 1.5, gaps  # loaded CI
  times.clear()
  client = C.RewardClient(url, retries=3, backoff=5.0, timeout=5, deadline_s=1.0)
  t0 = time.monotonic()
  with pytest.raises(C.RewardServerError, match=r"deadline of 1.0 s .*try 1/3; last error: "
                                                r"HTTP 500: down\)"):
    client(_images(1, h=8, w=8), ["a"])
  assert len(times) == 1 and time.monotonic() - t0 < 0.9


def test_unreachable_server():
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  client = C.RewardClient(f"http://127.0.0.1:{port}", retries=3, backoff=0.01, timeout=1)
  with pytest.raises(C.RewardServerError,
                     match=rf"reward server at http://127.0.0.1:{port} is not reachable after 3 "
                           r"tries: ConnectionRefusedError"):
    client(_images(1), ["a"])
  assert client.last_attempts == 3
  with pytest.raises(C.RewardServerError, match="not healthy"):
    client.health()


def test_timeout_is_retried(scripted):
  httpd, url = scripted

  def slow(req):
    time.sleep(0.5)
    return _ok(req)
  httpd.answer = slow
  client = C.RewardClient(url, retries=2, backoff=0.0, timeout=0.1)
  with pytest.raises(C.RewardServerError, match="not reachable after 2 tries: .*timed out"):
    client(_images(1), ["a"])
  assert len(httpd.requests) == 2


@pytest.mark.parametrize("answer, message", [
    (lambda req: (200, b"\xc1garbage"), "invalid response: not msgpack"),
    (lambda req: (200, msgpack.packb([1.0])), "expected a map, got list"),
    (lambda req: (200, msgpack.packb({"info": {}})), "'rewards' must be a list"),
    (lambda req: _ok(req, rewards=[1.0]), "1 rewards for a batch of 3 images"),
    (lambda req: _ok(req, rewards=[1.0, "x", 2.0]), "rewards are not numbers"),
    (lambda req: _ok(req, rewards=[[1.0], [2.0], [3.0]]), r"shape \(3, 1\)"),
    (lambda req: _ok(req, rewards=[1.0, float("nan"), 2.0]),
     r"non-finite rewards \[nan\] at \(index, prompt\) \[\(1, 'b'\)\]"),
    (lambda req: _ok(req, info=[1]), "'info' must be a map"),
    (lambda req: (200, msgpack.packb({"error": "oops"})), "answered an error: oops"),
])
def test_invalid_responses(scripted, answer, message):
  httpd, url = scripted
  httpd.answer = answer
  client = C.RewardClient(url, retries=3, backoff=0.0, timeout=5)
  with pytest.raises(C.RewardServerError, match=message):
    client(_images(3), ["a", "b", "c"])
  assert len(httpd.requests) == 1  # invalid data is not retried


def test_request_format_and_info_merge(scripted):
  httpd, url = scripted
  httpd.answer = lambda req: _ok(req, info={
      "answers": [f"ans {p}" for p in req["prompts"]], "batch_note": "x"})
  client = C.RewardClient(url, batch_size=2, timeout=5)
  images = _images(3)
  rewards, info = client(images, ["p0", "p1", "p2"],
                         {"ids": np.array([10, 11, 12]), "epoch": np.int64(4)})
  assert [len(r["images"]) for r in httpd.requests] == [2, 1]
  assert httpd.requests[0]["prompts"] == ["p0", "p1"]
  assert httpd.requests[1]["metadata"] == {"ids": [12], "epoch": 4}  # per-sample entries sliced
  assert httpd.requests[0]["images"][0] == C.encode_jpeg(images[0], quality=80)
  np.testing.assert_array_equal(rewards, [0, 1, 0])
  assert info["answers"].tolist() == ["ans p0", "ans p1", "ans p2"]
  assert info["batch_note"].tolist() == ["x", "x"]  # not per-sample: one per batch


# ------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------


def test_greedy_cosine():
  e = np.eye(4)[None]  # tokens: [CLS] w1 w2 [SEP], orthogonal
  mask = np.ones((1, 4))
  weight = np.array([[0, 1, 1, 0]])
  p, r, f = S.greedy_cosine(e, mask, weight, e, mask, weight)
  np.testing.assert_allclose([p[0], r[0], f[0]], 1.0)
  # candidate "[CLS] w1 [SEP] pad" vs reference "[CLS] w1 w2 [SEP]": P = 1, R = 1/2
  cand = np.stack([e[0, 0], e[0, 1], e[0, 3], np.zeros(4)])[None]
  p, r, f = S.greedy_cosine(cand, np.array([[1, 1, 1, 0]]), np.array([[0, 1, 0, 0]]),
                            e, mask, weight)
  np.testing.assert_allclose([p[0], r[0], f[0]], [1.0, 0.5, 2 / 3])
  # a sentence of special tokens only scores 0
  p, r, f = S.greedy_cosine(e, mask, np.zeros((1, 4)), e, mask, weight)
  assert p[0] == r[0] == f[0] == 0


def _save_tiny_llava(directory, transformers):
  """A random LLaVA (CLIP 32x32 tower + 2-layer Llama) and its processor, word-level vocab."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Answer",
           "concisely:", "what", "is", "going", "on", "in", "this", "image?", "a", "cat"]
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
      eos_token="</s>", additional_special_tokens=["<image>"])
  template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
              "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
              "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
  processor = transformers.LlavaProcessor(
      image_processor=transformers.CLIPImageProcessor(
          size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
      tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
      chat_template=template, image_token="<image>", num_additional_image_tokens=1)
  config = transformers.LlavaConfig(
      vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8,
                         hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=16),
      text_config=dict(model_type="llama", vocab_size=len(words), hidden_size=16,
                       intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3),
      image_token_index=4, vision_feature_layer=-2, vision_feature_select_strategy="default")
  transformers.LlavaForConditionalGeneration(config).save_pretrained(directory)
  processor.save_pretrained(directory)


def test_llava_bertscore_arguments_and_composition(tmp_path):
  with pytest.raises(ValueError, match="`model`.*is required"):
    S.LlavaBertScore()
  with pytest.raises(ValueError, match="must contain '{prompt}'"):
    S.LlavaBertScore("some/model", answer_template="The image contains")
  with pytest.raises(ValueError, match="batch_size"):
    S.LlavaBertScore("some/model", batch_size=0)
  with pytest.raises(ValueError, match="dtype"):
    S.VlmAnswerer("some/model", dtype="int8")
  with pytest.raises(ValueError, match="`model`"):
    S.BertScore("")
  # The scorer's plumbing with a fake VLM and BERTScore on a tiny random BERT (no weights here).
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "image", "contains", "a",
           "cat", "dog", "riding", "bike", "an", "ant"]
  tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
  torch.manual_seed(0)
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32))
  bert_dir = str(tmp_path / "bert")
  bert.save_pretrained(bert_dir)
  tok.save_pretrained(bert_dir)
  bertscore = S.BertScore(bert_dir, num_layers=1, device="cpu")
  assert bertscore.num_layers == 1 and bertscore.max_length == 32
  questions = []

  def answerer(images, question):
    questions.append((len(images), question))
    return ["The image contains a cat riding a bike", "a dog", ""][:len(images)]
  scorer = S.BUILTIN["llava_bertscore"](answerer=answerer, bertscore=bertscore, batch_size=3)
  rewards, info = scorer(_images(3), ["a cat riding a bike", "an ant", "a dog"], {})
  assert questions == [(3, S.QUESTION)]
  assert info["answers"] == ["The image contains a cat riding a bike", "a dog", ""]
  assert abs(rewards[0] - 1.0) < 1e-6 and abs(info["precision"][0] - 1.0) < 1e-6
  assert 0 < rewards[1] < 1 and rewards[2] == 0.0  # an empty answer scores 0
  p, r, f = bertscore(["the cat"], ["the image contains a cat"])
  assert p[0] > r[0]  # every candidate token is in the reference, not the reverse


def test_llava_bertscore_tiny_random_models(tmp_path):
  """The real code path (AutoProcessor + AutoModelForImageTextToText.generate + BERTScore) on
  tiny random models saved locally: runs, shapes and types only (the answers are noise)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("tokenizers")
  llava_dir, bert_dir = str(tmp_path / "llava"), str(tmp_path / "bert")
  torch.manual_seed(0)
  _save_tiny_llava(llava_dir, transformers)
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "image", "contains", "a", "cat"]
  transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(bert_dir)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32)).save_pretrained(bert_dir)
  scorer = S.LlavaBertScore(llava_dir, bert_model=bert_dir, bert_layer=2, device="cpu",
                            dtype="float32", max_new_tokens=4, batch_size=2)
  images = _images(3, h=40, w=48)
  rewards, info = scorer(images, ["a cat", "a dog", "a cat"], {})
  assert len(rewards) == 3 and all(np.isfinite(rewards))
  assert set(info) == {"precision", "f1", "answers"}
  assert all(isinstance(a, str) for a in info["answers"])
  # Batched (left-padded) generation answers as one image at a time.
  single = [scorer.answerer(images[i:i + 1], S.QUESTION)[0] for i in range(3)]
  assert single == info["answers"]


# ------------------------------------------------------------------------------------------
# Limits under hostile or heavy use (an in-process server on 127.0.0.1)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def limited():
  """A server with small limits: 64x64 pixels per image, 3 * 64 * 64 per request, 0.5 s read
  timeout, 2 connections; yields (server, url)."""
  server = srv.RewardServer(("127.0.0.1", 0), S.brightness, name="brightness",
                            max_image_pixels=64 * 64, max_request_pixels=3 * 64 * 64,
                            read_timeout_s=0.5, max_connections=2)
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield server, server.url
  finally:
    server.shutdown()
    server.server_close()


def _score_body(images, prompts=None):
  prompts = prompts or ["p"] * len(images)
  return msgpack.packb({"images": [C.encode_jpeg(im) for im in images], "prompts": prompts},
                       use_bin_type=True)


def test_images_over_the_pixel_limits_are_413_before_decoding(limited, monkeypatch):
  _, url = limited
  decoded = []
  real = srv._decode
  monkeypatch.setattr(srv, "_decode", lambda img: decoded.append(1) or real(img))
  status, answer = _post_raw(url, _score_body(_images(1, h=65, w=64)))
  assert status == 413
  assert "64x65 = 4160 pixels, over the limit of 4096 per image" in answer["error"]
  status, answer = _post_raw(url, _score_body(_images(4, h=64, w=64)))
  assert status == 413 and "16384 pixels, over the limit of 12288 per request" in answer["error"]
  assert decoded == []  # refused from the headers: nothing was decoded
  status, answer = _post_raw(url, _score_body(_images(3, h=64, w=64)))
  assert status == 200 and len(answer["rewards"]) == 3 and len(decoded) == 3
  with pytest.raises(C.RewardServerError, match=r"HTTP 413\): image 0 is 80x64"):
    C.RewardClient(url, retries=3, backoff=0.001)(_images(1, h=64, w=80), ["p"])


def _silent_connection(url, declared=500 * 2**20):
  """A connection that declares a body of `declared` bytes and then sends nothing."""
  host, port = url.split("//")[1].split(":")
  sock = socket.create_connection((host, int(port)), timeout=5)
  sock.sendall(f"POST /score HTTP/1.0\r\nContent-Length: {declared}\r\n\r\n".encode())
  return sock


def test_a_silent_client_times_out_with_408_and_frees_its_slot(limited):
  server, url = limited
  sock = _silent_connection(url, declared=100)
  t0 = time.monotonic()
  answer = sock.recv(4096)
  sock.close()
  assert answer.startswith(b"HTTP/1.0 408"), answer[:200]
  assert 0.4 < time.monotonic() - t0 < 3
  status, _ = _post_raw(url, _score_body(_images(1, h=8, w=8)))
  assert status == 200


def test_connections_over_the_limit_are_503_then_served_again(limited):
  server, url = limited
  held = [_silent_connection(url) for _ in range(2)]  # both slots held
  time.sleep(0.1)
  status, answer = _post_raw(url, _score_body(_images(1, h=8, w=8)))
  assert status == 503 and "2 connections already open" in answer["error"]
  for sock in held:  # the server answers them 408 after its read timeout
    assert sock.recv(4096).startswith(b"HTTP/1.0 408")
    sock.close()
  deadline = time.monotonic() + 5
  while time.monotonic() < deadline:  # slots are released as the handler threads end
    status, answer = _post_raw(url, _score_body(_images(1, h=8, w=8)))
    if status == 200:
      break
    time.sleep(0.05)
  assert status == 200, answer


# ------------------------------------------------------------------------------------------
# Shapes, deadlines and per-client limits (in-process servers on 127.0.0.1; a second client
# address is 127.0.0.2, also loopback)
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _serving(scorer, name="scorer", **limits):
  """An in-process `RewardServer` of `scorer` with `limits`, stopped on exit; yields it."""
  server = srv.RewardServer(("127.0.0.1", 0), scorer, name=name, **limits)
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_rewards_of_any_shape_but_one_per_image_are_500():
  """A scorer's (B/2, 2) rewards were flattened into B rewards (each image got another's)."""
  def paired(images, prompts, metadata):
    return np.arange(len(prompts), dtype=np.float32).reshape(-1, 2), {}

  def column(images, prompts, metadata):
    return np.zeros((len(prompts), 1)), {}
  with _serving(paired, name="paired") as server:
    status, answer = _post_raw(server.url, _score_body(_images(4, h=8, w=8)))
    assert status == 500, answer
    assert ("scorer paired returned rewards of shape (2, 2) for 4 images; it must return one "
            "reward per image, shape (4,)") in answer["error"]
    with pytest.raises(C.RewardServerError, match=r"HTTP 500: scorer paired .*shape \(2, 2\)"):
      C.RewardClient(server.url, retries=1)(_images(4, h=8, w=8), list("abcd"))
  with _serving(column, name="column", batch_size=2) as server:  # per scorer call of 2
    status, answer = _post_raw(server.url, _score_body(_images(3, h=8, w=8)))
    assert status == 500 and "shape (2, 1) for 2 images" in answer["error"], answer


def test_a_frozen_server_is_given_up_at_the_call_deadline_with_progress_lines():
  """A frozen server used to stall a call for retries x timeout (3 x 120 s) without a word:
  the call now logs while it waits and ends at its deadline, naming the setting."""
  release = threading.Event()

  def frozen(images, prompts, metadata):
    release.wait(10)
    return [0.0] * len(prompts), {}
  lines = []
  with _serving(frozen, name="frozen") as server:
    try:
      client = C.RewardClient(server.url, timeout=0.6, retries=3, backoff=0.0, deadline_s=1.5,
                              progress_every_s=0.25, log=lines.append)
      t0 = time.monotonic()
      with pytest.raises(C.RewardServerError,
                         match=rf"reward server at {server.url} did not finish within the "
                               r"deadline of 1.5 s for the whole call \(all batches and tries; "
                               r"at batch 1/1, try 3/3; last error: .*timed out\); if the server "
                               r"is only slow, raise config.reward.server_deadline_s"):
        client(_images(1, h=8, w=8), ["a"])
      assert 1.4 < time.monotonic() - t0 < 2.5
    finally:
      release.set()
  assert 4 <= len(lines) <= 8, lines
  for line in lines:
    assert re.fullmatch(rf"waiting for reward server {server.url}: \d+ s, batch 1/1, try [123]/3 "
                        r"\(deadline 1.5 s for the whole call\)", line), line
  assert "try 1/3" in lines[0] and "try 3/3" in lines[-1], lines

  def slow(images, prompts, metadata):
    time.sleep(0.4)
    return [1.0] * len(prompts), {}
  with _serving(slow, name="slow") as server:  # the deadline spans all batches of a call
    client = C.RewardClient(server.url, batch_size=1, timeout=5, retries=2, backoff=0.0,
                            deadline_s=1.0, log=lines.append)
    t0 = time.monotonic()
    with pytest.raises(C.RewardServerError, match=r"deadline of 1.0 s .*at batch 3/3, try 1/2"):
      client(_images(3, h=8, w=8), list("abc"))
    assert 0.9 < time.monotonic() - t0 < 2.0
    rewards, _ = C.RewardClient(server.url, deadline_s=1.0)(_images(2, h=8, w=8), ["a", "b"])
    assert rewards.tolist() == [1.0, 1.0]  # one batch of 2 fits


def _drip_open(url, source="127.0.0.1", in_headers=False):
  """A connection from `source` that starts a POST /score and is then to be dripped: in its
  body (10 kB declared) or, with `in_headers`, in an unfinished header line."""
  host, port = url.split("//")[1].split(":")
  sock = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
  head = "POST /score HTTP/1.0\r\n" + ("X-Slow: " if in_headers else
                                       "Content-Length: 10000\r\n\r\n")
  sock.sendall(head.encode())
  return sock


class _Dripper(threading.Thread):
  """Sends one byte on each of `socks` every `every` s until the server answers it (its whole
  answer, to EOF) or `limit_s` passes. answers: {index: (answer bytes, seconds after start)};
  sent: bytes sent per socket."""

  def __init__(self, socks, every=0.1, limit_s=6.0):
    super().__init__(daemon=True)
    self.socks, self.every, self.limit_s = socks, every, limit_s
    self.answers, self.sent, self.stop = {}, [0] * len(socks), threading.Event()

  def _answer(self, sock):
    sock.settimeout(2)
    data = b""
    for _ in range(100):
      try:
        chunk = sock.recv(65536)
      except OSError:
        break
      if not chunk:
        break
      data += chunk
    return data

  def run(self):
    t0 = time.monotonic()
    for _ in range(int(self.limit_s / self.every) + 1):
      if self.stop.is_set() or len(self.answers) == len(self.socks) or \
          time.monotonic() - t0 > self.limit_s:
        return
      for i, sock in enumerate(self.socks):
        if i in self.answers:
          continue
        if select.select([sock], [], [], 0)[0]:
          self.answers[i] = (self._answer(sock), time.monotonic() - t0)
          continue
        try:
          sock.send(b"x")
          self.sent[i] += 1
        except OSError as e:
          self.answers[i] = (repr(e).encode(), time.monotonic() - t0)
      self.stop.wait(self.every)


def test_a_slow_drip_request_is_cut_at_the_request_deadline():
  """A byte every 0.1 s keeps the 0.5 s read timeout from firing, in the body or in the
  headers: the whole-request deadline (1 s) cuts both (they used to run for as long as the
  client kept dripping)."""
  with _serving(S.brightness, read_timeout_s=0.5, request_deadline_s=1.0) as server:
    socks = [_drip_open(server.url), _drip_open(server.url, in_headers=True)]
    dripper = _Dripper(socks, every=0.1, limit_s=5.0)
    dripper.start()
    dripper.join(7)
    dripper.stop.set()
    for sock in socks:
      sock.close()
    assert sorted(dripper.answers) == [0, 1], dripper.answers
    for i, what in enumerate([b"the request body", b"the request's headers"]):
      answer, seconds = dripper.answers[i]
      assert answer.startswith(b"HTTP/1.0 408"), answer[:300]
      assert what + b" was not received within 1.0 s of the connection (--request_deadline_s)" \
          in answer, answer
      assert 0.9 < seconds < 2.0 and dripper.sent[i] >= 7, (seconds, dripper.sent)
    status, _ = _post_raw(server.url, _score_body(_images(1, h=8, w=8)))
    assert status == 200


def _post_from(url, body, source):
  """POST /score of `body` from the local address `source` -> (status, decoded answer)."""
  host, port = url.split("//")[1].split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=5, source_address=(source, 0))
  try:
    conn.request("POST", "/score", body=body, headers={"Content-Type": C.CONTENT_TYPE})
    resp = conn.getresponse()
    return resp.status, msgpack.unpackb(resp.read())
  finally:
    conn.close()


def test_one_client_address_cannot_take_every_slot():
  """Slow connections from 127.0.0.1 at its per-client bound (2 of 4 slots): another from
  127.0.0.1 is answered 503 at once while 127.0.0.2 is served; once the slow ones are cut at
  the request deadline, 127.0.0.1 is served again."""
  with pytest.raises(ValueError, match=r"max_connections_per_client \(5\) must be <= "
                                       r"max_connections \(4\)"):
    srv.RewardServer(("127.0.0.1", 0), S.brightness, max_connections=4,
                     max_connections_per_client=5)
  body = _score_body(_images(1, h=8, w=8))
  with _serving(S.brightness, read_timeout_s=0.5, request_deadline_s=2.0, max_connections=4,
                max_connections_per_client=2) as server:
    socks = [_drip_open(server.url) for _ in range(2)]
    dripper = _Dripper(socks, every=0.1, limit_s=6.0)
    dripper.start()
    try:
      time.sleep(0.2)  # both accepted: their handlers hold 127.0.0.1's 2 connections
      t0 = time.monotonic()
      status, answer = _post_from(server.url, body, "127.0.0.1")
      assert status == 503, answer
      assert time.monotonic() - t0 < 1.0
      assert ("server busy: 2 connections already open from 127.0.0.1, the limit per client "
              "(--max_connections_per_client=2); retry later") == answer["error"]
      status, answer = _post_from(server.url, body, "127.0.0.2")
      assert status == 200 and len(answer["rewards"]) == 1, answer
      assert not dripper.answers  # the slow connections were open all along
      dripper.join(7)
      assert sorted(dripper.answers) == [0, 1], dripper.answers
      assert all(a.startswith(b"HTTP/1.0 408") for a, _ in dripper.answers.values())
      for _ in range(50):  # their slots are released as their handler threads end
        status, answer = _post_from(server.url, body, "127.0.0.1")
        if status == 200:
          break
        time.sleep(0.1)
      assert status == 200, answer
      for _ in range(50):  # every connection's count is given back as its handler ends
        if not server.per_client:
          break
        time.sleep(0.1)
      assert server.per_client == {}
    finally:
      dripper.stop.set()
      for sock in socks:
        sock.close()
