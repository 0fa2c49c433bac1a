"""Rewards served over HTTP (common/remote.py, reward_server.py) and scored while the next batch samples: real servers
on 127.0.0.1 (an ephemeral port, started and stopped by each test), no other machine contacted."""

import base64
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from common.remote import HttpReward, image_from_base64, png_base64
from common.rewards import make_reward
from scripts import EPOCHS_TINY, definitions, read_metrics, run_script

SERVER = definitions("reward_server.py")
PROMPTS = ["a red circle on a white background", "a blue square on a yellow background"]


def started(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture
def served():
    """reward_server.py's server of a reward (in this process, on a free port): a function of the reward's spec that
    returns its URL; every server started is shut down after the test."""
    servers = []

    def serve(spec: str, **limits) -> str:
        servers.append(SERVER["serve"](make_reward(spec), spec, "cpu", "127.0.0.1", 0, **limits))
        return started(servers[-1])

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake():
    """A server whose every answer is `reply(request body) -> (status, bytes)`, for the bad-server cases."""
    servers = []

    def serve(reply) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                status, body = reply(self.rfile.read(int(self.headers["Content-Length"])))
                if status is None:  # hang up without an answer
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        servers.append(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        return started(servers[-1])

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(HttpReward, "backoff", 0.01)
    monkeypatch.setattr(HttpReward, "timeout", 10.0)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def reply(status: int, payload) -> tuple[int, bytes]:
    return status, (payload if isinstance(payload, bytes) else json.dumps(payload).encode())


# ---- the protocol ----
def test_png_round_trip_is_the_images_rounded_to_8_bits():
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    for image in images:
        back = image_from_base64(png_base64(image), max_pixels=10**6)
        torch.testing.assert_close(back, (image * 255).round() / 255, rtol=0, atol=1e-6)


def test_served_reward_equals_the_reward_in_process(served):
    """JPEG size rounds to 8 bits itself, so the PNG the protocol sends changes nothing: the same numbers; a weighted
    sum with a served term equals the sum in process."""
    url = served("jpeg_incompressibility")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    remote, local = make_reward(url), make_reward("jpeg_incompressibility")
    torch.testing.assert_close(remote(images, PROMPTS * 2), local(images, PROMPTS * 2))
    mixed = make_reward(f"{url}+0.1*colorfulness")
    expected = local(images, PROMPTS * 2) + 0.1 * make_reward("colorfulness")(images, PROMPTS * 2)
    torch.testing.assert_close(mixed(images, PROMPTS * 2), expected)


def test_the_server_refuses_bad_requests_with_4xx_and_keeps_serving(served):
    url = served("colorfulness", max_images=3, max_pixels=32 * 32, max_request_pixels=2 * 32 * 32, max_body_mb=1)
    png = png_base64(torch.rand(3, 8, 8))
    cases = {
        b"not json": (400, "not JSON"),
        json.dumps({"prompts": ["a"]}).encode(): (400, '"images"'),
        json.dumps({"images": [png]}).encode(): (400, '"prompts"'),
        json.dumps({"images": [png, png], "prompts": ["a"]}).encode(): (400, "one prompt per image"),
        json.dumps({"images": [], "prompts": []}).encode(): (400, "at least one"),
        json.dumps({"images": [png] * 4, "prompts": ["a"] * 4}).encode(): (413, "at most 3"),
        json.dumps({"images": ["%%%"], "prompts": ["a"]}).encode(): (400, "not base64"),
        json.dumps({"images": [base64.b64encode(b"GIF89a....").decode()], "prompts": ["a"]}).encode(): (400, "PNG"),
        json.dumps({"images": [png_base64(torch.zeros(3, 64, 64))], "prompts": ["a"]}).encode(): (413, "pixels"),
        json.dumps({"images": [png, png_base64(torch.rand(3, 8, 9))], "prompts": ["a", "b"]}).encode(): (400, "size"),
        json.dumps({"images": [7], "prompts": ["a"]}).encode(): (400, "not a string"),
        json.dumps({"images": [png_base64(torch.zeros(3, 32, 32))] * 3, "prompts": ["a"] * 3}).encode(): (
            413,
            "2048 pixels in all",
        ),  # each image within its limit, not the three together
        json.dumps({"images": [png] * 3, "prompts": ["a" * 2**19] * 3}).encode(): (413, "at most 1 MiB"),
    }
    for body, (status, said) in cases.items():
        got, answer = post(url, body)
        assert got == status and said in answer["error"], (body[:40], got, answer)
    status, answer = post(url, json.dumps({"images": [png], "prompts": ["a"]}).encode())
    assert status == 200 and len(answer["rewards"]) == 1
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read())["reward"] == "colorfulness"


def test_a_reward_that_fails_on_the_server_is_answered_500(served, tmp_path):
    path = tmp_path / "picky.py"
    path.write_text(
        "def Picky(images, prompts):\n    if len(images) == 3:\n        raise ValueError('3')\n"
        "    return images.mean(dim=(1, 2, 3))\n"
    )
    url = served(f"{path}:Picky")
    png = png_base64(torch.rand(3, 8, 8))
    status, answer = post(url, json.dumps({"images": [png] * 3, "prompts": ["a"] * 3}).encode())
    assert status == 500 and "failed on this request" in answer["error"]
    assert post(url, json.dumps({"images": [png], "prompts": ["a"]}).encode())[0] == 200


# ---- the client: every bad answer ends in one sentence ----
BAD_ANSWERS = {
    "an HTTP error": (lambda body: reply(500, {"error": "the judge is out of memory"}), "HTTP 500 (the judge is out"),
    "a refusal": (lambda body: reply(400, b"bad request"), "HTTP 400 (bad request)"),
    "not JSON": (lambda body: reply(200, b"<html>"), "not JSON"),
    "no rewards": (lambda body: reply(200, {"scores": [1, 2]}), 'list of numbers under "rewards"'),
    "strings": (lambda body: reply(200, {"rewards": ["1", "2"]}), 'list of numbers under "rewards"'),
    "the wrong count": (lambda body: reply(200, {"rewards": [1.0]}), "answered 1 rewards for 2 images"),
    "NaN": (lambda body: reply(200, b'{"rewards": [1.0, NaN]}'), "answered nan for an image"),
    "no answer": (lambda body: (None, b""), "cannot be reached after 5 tries"),
}


@pytest.mark.parametrize("case", BAD_ANSWERS)
def test_a_bad_answer_ends_in_one_sentence(case, fake, capsys):
    answer, said = BAD_ANSWERS[case]
    reward = HttpReward(fake(answer))
    with pytest.raises(SystemExit) as exit_info:
        reward(torch.rand(2, 3, 8, 8), PROMPTS)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: the reward server http://127.0.0.1:"), error
    assert said in error and error.count("\n") == 1, error


def test_an_unreachable_server_is_retried_then_named(capsys):
    with pytest.raises(SystemExit):
        HttpReward("http://127.0.0.1:9/")(torch.rand(1, 3, 8, 8), ["a"])  # port 9 (discard): nothing listens
    assert "cannot be reached after 5 tries" in capsys.readouterr().err


def test_a_busy_server_is_retried_until_it_answers(fake):
    calls = []

    def busy_twice(body):
        calls.append(1)
        return reply(503, b"busy") if len(calls) <= 2 else reply(200, {"rewards": [0.5, 1.5], "ocr": [1, 0]})

    reward = make_reward(fake(busy_twice) + "+0*colorfulness")  # its check of the contract: busy twice, then served
    assert len(calls) == 3
    calls.clear()
    assert reward(torch.rand(2, 3, 8, 8), PROMPTS).tolist() == pytest.approx([0.5, 1.5])
    assert len(calls) == 3
    assert reward.last["ocr"].tolist() == [1.0, 0.0]  # a served list of numbers per image is logged by its key


def test_draft_refuses_a_served_reward_before_contacting_it(capsys):
    with pytest.raises(SystemExit):
        make_reward("http://127.0.0.1:9/", differentiable=True)
    assert "served over HTTP" in capsys.readouterr().err


# ---- in a run ----
@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddpo.py", "rwr.py"])
def test_a_served_reward_scored_in_the_background_changes_no_number(
    script, served, tiny_sd_path, tmp_path, monkeypatch
):
    """The same run twice: the reward in-process, each batch scored in turn; the reward served over HTTP, each batch
    scored in a worker thread while the next one samples. Every logged number is the same."""
    args = ["--pretrained-model", tiny_sd_path, *EPOCHS_TINY, "--num-epochs", "2", "--sample-every", "1"]
    run_script(script, [*args, "--no-async-reward", "--output-dir", str(tmp_path / "local")], monkeypatch)
    url = served("jpeg_incompressibility")
    run_script(script, [*args, "--reward", url, "--output-dir", str(tmp_path / "remote")], monkeypatch)
    (_, local), (_, remote) = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "remote")
    keys = ("reward_mean", "reward_std", "loss", "eval_reward_mean", "grad_norm")
    assert [[m[k] for k in keys] for m in local] == [[m[k] for k in keys] for m in remote]


@pytest.mark.slow
def test_a_server_that_fails_mid_run_leaves_a_checkpoint_to_resume(fake, tiny_sd_path, tmp_path, monkeypatch, capsys):
    """The server answers the start's check and the first epoch, then errors: the run ends with one sentence naming
    the last checkpoint (exit 2); resumed against a server that answers, it runs to its end."""
    local, state = make_reward("jpeg_incompressibility"), {"calls": 0, "broken": True}

    def flaky(body):
        request = json.loads(body)
        state["calls"] += 1
        if state["broken"] and state["calls"] > 4:  # the check, the first evaluation, epoch 1's two batches
            return reply(502 if state["calls"] % 2 else 500, b"gateway gone")
        images = torch.stack([image_from_base64(i, 10**6) for i in request["images"]])
        return reply(200, {"rewards": local(images, request["prompts"]).tolist()})

    url = fake(flaky)
    args = ["--pretrained-model", tiny_sd_path, *EPOCHS_TINY, "--reward", url, "--num-epochs", "3", "--save-every",
            "1", "--sample-every", "100", "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_script("ddpo.py", args, monkeypatch)
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    run_dir, metrics = read_metrics(tmp_path / "runs")
    assert exit_info.value.code == 2 and "answered HTTP 500" in error and "epoch_000001" in error, error
    assert [m["epoch"] for m in metrics] == [1]
    state["broken"] = False
    run_script("ddpo.py", [*args, "--resume", run_dir], monkeypatch)
    assert [m["epoch"] for m in read_metrics(tmp_path / "runs")[1]] == [1, 2, 3]
