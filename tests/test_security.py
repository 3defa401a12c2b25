"""Safety of the served app (docs/ARCHITECTURE.md, Robustness): local bind by default, file routes that serve
only what they should, upload size limit, a polite answer when the queue is full, no endpoint that opens a
model path."""
from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlparse

import pytest
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

import app as studio_app
from tests.conftest import REPO, start_app
from tests.test_api import common_args

SECRET_MARKERS = ("root:x:0:0", "root:*:0:0", "def build_app", "[fonts]", "LDS_")


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte (http.client does not normalise '..' or re-encode anything)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_default_bind_is_localhost(monkeypatch):
    for name in ("LDS_HOST", "LDS_AUTH", "LDS_PORT", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = studio_app.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.share and args.auth is None
    assert studio_app.AppSettings().host == "127.0.0.1"


def test_auth_parsing():
    assert studio_app.parse_auth("ann:secret") == [("ann", "secret")]
    assert studio_app.parse_auth("a:1, b:2") == [("a", "1"), ("b", "2")]
    with pytest.raises(SystemExit):
        studio_app.parse_auth("no-password")


ETC = "/etc/passwd"
TRAVERSALS = [
    f"/gradio_api/file={ETC}",
    f"/file={ETC}",
    "/gradio_api/file=/ETC/PASSWD",
    "/gradio_api/file=/etc//passwd",
    "/gradio_api/file=/etc/./passwd",
    "/gradio_api/file=//etc/passwd",
    "/gradio_api/file=../../../../../../etc/passwd",
    "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/gradio_api/file=%2Fetc%2Fpasswd",
    "/gradio_api/file=%252Fetc%252Fpasswd",
    "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/file=....//....//....//etc/passwd",
    "/gradio_api/file=/etc/passwd%00.png",
    "/gradio_api/file=/proc/self/environ",
    "/gradio_api/file=~/.bashrc",
    "/gradio_api/file=C:\\Windows\\win.ini",
    "/static/../../../../etc/passwd",
    "/assets/../../../../etc/passwd",
    "/gradio_api/file=/tmp/../etc/passwd",
    f"/gradio_api/file={REPO}/app.py",
    f"/gradio_api/file={REPO}/assets/examples/../../app.py",
    f"/gradio_api/file={REPO}/assets/examples/%2e%2e/%2e%2e/app.py",
    f"/gradio_api/file={REPO}/ASSETS/examples/../../app.py",
    f"/gradio_api/file={REPO}/pipelines/settings.py",
    f"/gradio_api/file={REPO}/assets/models/shapes-ldm/model_index.json",
    "/gradio_api/file=app.py",
    "/gradio_api/file=./app.py",
    "/file=app.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_file_routes_refuse_outside_files(live_app, path):
    status, body = raw_get(live_app.url, path)
    text = body.decode("utf-8", "replace")
    assert status != 200 or not any(marker in text for marker in SECRET_MARKERS), (status, text[:200])
    assert status in (400, 403, 404, 405, 422), (status, text[:200])


def test_example_files_are_served(live_app):
    example = REPO / "assets" / "examples" / "scene_a.png"
    status, body = raw_get(live_app.url, f"/gradio_api/file={example}")
    assert status == 200 and body == example.read_bytes()


def upload(url: str, name: str, data: bytes) -> int:
    parts = urlparse(url)
    boundary = "----lds-test-boundary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", "/gradio_api/upload", body=payload,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_oversize_upload_is_refused(live_app):
    limit = live_app.settings.max_file_size_mb * 1024 * 1024
    assert upload(live_app.url, "small.png", b"\x89PNG" + b"\0" * 1000) == 200
    assert upload(live_app.url, "huge.png", b"\x89PNG" + b"\0" * (limit + 1024)) == 413


def call_raw(url: str, api_name: str, data: list) -> tuple[str, str]:
    """The REST route a curl user would take: POST /gradio_api/call/<name>, then read the event stream."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", f"/gradio_api/call/{api_name}", body=json.dumps({"data": data}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            return "http", f"{response.status} {body}"
        event_id = json.loads(body)["event_id"]
        conn.request("GET", f"/gradio_api/call/{api_name}/{event_id}")
        stream = conn.getresponse().read().decode()
    finally:
        conn.close()
    kind = "error" if "event: error" in stream else "complete" if "event: complete" in stream else "other"
    return kind, stream


@pytest.mark.parametrize("path", ["/etc/passwd", str(REPO / "app.py"), "../../../../etc/passwd"])
def test_server_paths_are_not_accepted_as_inputs(live_app, path):
    file = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.png"}
    kind, stream = call_raw(live_app.url, "preprocess", [file, "canny", "none", 100, 200])
    assert kind in ("error", "http"), stream[:300]
    assert not any(marker in stream for marker in SECRET_MARKERS)


def test_no_endpoint_takes_a_model_path_or_url(client):
    api = client.view_api(return_format="dict", print_info=False)
    forbidden = ("model", "checkpoint", "ckpt", "repo", "url", "lora", "weights", "path")
    for name, endpoint in {**api["named_endpoints"], **api["unnamed_endpoints"]}.items():
        for parameter in endpoint["parameters"]:
            label = f"{parameter.get('parameter_name')} {parameter.get('label')}".lower()
            assert not any(word in label for word in forbidden), (name, parameter)


def test_queue_full_is_answered_politely(app_engine):
    server = start_app(app_engine, queue_size=1)
    try:
        long_run = dict(prompt="a red circle", width=app_engine.limits.max_size, height=app_engine.limits.max_size,
                        **common_args(steps=app_engine.limits.max_steps, batch_size=app_engine.limits.max_batch))
        clients = [server.client() for _ in range(4)]
        jobs = [clients[0].submit(**long_run, api_name="/txt2img")]
        deadline = time.time() + 60
        while time.time() < deadline and not (jobs[0].outputs() or []):
            time.sleep(0.1)  # the first job is running
        jobs += [c.submit(**long_run, api_name="/txt2img") for c in clients[1:]]
        errors = []
        for job in jobs[1:]:
            try:
                job.result(timeout=5)
            except (AppError, QueueError) as error:
                errors.append(str(error))
            except TimeoutError:  # queued behind the running job: fine
                pass
        assert any("queue is full" in e.lower() and "try again" in e.lower() for e in errors), errors
        for job in jobs:  # gradio_client's own cancel: dequeues waiting jobs, stops the running generator
            job.cancel()
        # the app stays usable
        assert server.client().predict(prompt="a red circle", width=64, height=64, **common_args(steps=1),
                                       api_name="/txt2img")[2]["steps"] == 1
    finally:
        server.app.close()
