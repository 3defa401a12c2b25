"""Hosting: where the app listens (flags, LDS_*, then Gradio's own GRADIO_SERVER_* as Spaces set them), what a
login guards (every page, API, file, upload and queue route), what `--share` asks for, and which deployments
count as public (the safety checker's default)."""
from __future__ import annotations

import http.cookiejar
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

import app as studio_app
from tests.conftest import REPO, free_port, start_app
from tests.test_api import common_args

PYTHON = sys.executable
USER, PASSWORD = "ann", "s3cret-pw"
EXAMPLE = REPO / "assets" / "examples" / "scene_a.png"


# --- where it listens ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, ("127.0.0.1", 7860)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}, ("0.0.0.0", 7861)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "LDS_HOST": "127.0.0.2"}, ("127.0.0.2", 7860)),
    ({"GRADIO_SERVER_PORT": "7861", "LDS_PORT": "7999"}, ("127.0.0.1", 7999)),
])
def test_address_precedence(env, expected):
    assert studio_app.server_address(env) == expected


def test_flags_beat_every_variable(monkeypatch):
    for name, value in {"LDS_HOST": "127.0.0.2", "LDS_PORT": "7999", "GRADIO_SERVER_NAME": "0.0.0.0",
                        "GRADIO_SERVER_PORT": "7861"}.items():
        monkeypatch.setenv(name, value)
    args = studio_app.parse_args(["--host", "127.0.0.3", "--port", "8123"])
    assert (args.host, args.port) == ("127.0.0.3", 8123)
    args = studio_app.parse_args([])
    assert (args.host, args.port) == ("127.0.0.2", 7999)


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_a_bad_port_variable_names_itself(value):
    with pytest.raises(SystemExit, match=f"GRADIO_SERVER_PORT.*{value}"):
        studio_app.server_address({"GRADIO_SERVER_PORT": value})


def listening(port: int) -> set[str]:
    """The IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def non_loopback_address() -> str | None:
    """This machine's own address on its network (what a Space's proxy connects to), if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def start_process(env_overrides: dict, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LDS_THREADS": "1", **env_overrides}
    for name in ("LDS_HOST", "LDS_PORT", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "LDS_AUTH", "LDS_MODEL",
                 "SPACE_ID", "SPACES_ZERO_GPU", "LDS_SAFETY_CHECKER"):
        if name not in env_overrides:
            env.pop(name, None)
    return subprocess.Popen([PYTHON, "app.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 180) -> set[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        addresses = listening(port)
        if addresses:
            return addresses
        if process.poll() is not None:
            pytest.fail("the app exited: " + process.stdout.read())
        time.sleep(0.5)
    pytest.fail(f"nothing listened on port {port} within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def get(url: str, opener=None, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with (opener or urllib.request.build_opener()).open(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


@pytest.mark.slow
def test_started_the_way_a_space_starts_it_the_app_listens_on_all_interfaces():
    """SPACE_ID, GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT, no flags: the Space's proxy must reach it.
    LDS_AUTH (a Space secret) guards it."""
    port = free_port()
    process = start_process({"SPACE_ID": "someone/latent-diffusion-studio", "SYSTEM": "spaces",
                             "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port),
                             "LDS_AUTH": f"{USER}:{PASSWORD}"})
    try:
        assert wait_until_listening(process, port) == {"0.0.0.0"}
        other = non_loopback_address()
        for host in ["127.0.0.1"] + ([other] if other else []):
            status, _ = get(f"http://{host}:{port}/config")
            assert status == 401, host  # reachable, and LDS_AUTH asks for a login
            opener = logged_in(f"http://{host}:{port}")
            status, body = get(f"http://{host}:{port}/config", opener)
            assert status == 200 and "Latent Diffusion Studio" in body
    finally:
        stop(process)


@pytest.mark.slow
def test_without_any_variable_the_app_listens_on_localhost_7860():
    if listening(studio_app.DEFAULT_PORT) or listening_anywhere(studio_app.DEFAULT_PORT):
        pytest.skip(f"port {studio_app.DEFAULT_PORT} is taken on this machine")
    process = start_process({})
    try:
        assert wait_until_listening(process, studio_app.DEFAULT_PORT) == {"127.0.0.1"}
        status, body = get(f"http://127.0.0.1:{studio_app.DEFAULT_PORT}/config")
        assert status == 200 and "Latent Diffusion Studio" in body
    finally:
        stop(process)


def listening_anywhere(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- share links ------------------------------------------------------------------------------------------------

def test_share_without_auth_is_refused_with_the_flag_that_allows_it(monkeypatch):
    monkeypatch.delenv("LDS_AUTH", raising=False)
    result = subprocess.run([PYTHON, "app.py", "--share"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "LDS_AUTH"})
    assert result.returncode == 2
    assert "--auth" in result.stderr and studio_app.SHARE_WITHOUT_AUTH_FLAG in result.stderr
    assert studio_app.parse_args(["--share", studio_app.SHARE_WITHOUT_AUTH_FLAG]).share  # the explicit choice
    assert studio_app.parse_args(["--share", "--auth", "a:b"]).share
    monkeypatch.setenv("LDS_AUTH", "a:b")
    assert studio_app.parse_args(["--share"]).share  # a login from the environment counts


def test_which_deployments_are_public():
    settings = studio_app.AppSettings
    assert not studio_app.is_public(settings(), {})
    assert not studio_app.is_public(settings(host="127.0.0.5"), {})
    assert studio_app.is_public(settings(host="0.0.0.0"), {})
    assert studio_app.is_public(settings(share=True), {})
    assert studio_app.is_public(settings(), {"SPACE_ID": "a/b"})


# --- a login guards everything -----------------------------------------------------------------------------------

def logged_in(url: str):
    """An opener holding the session cookie of a successful login."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    status, body = get(f"{url}/login", opener, form, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(body)["success"], body
    return opener


def upload_body(data: bytes) -> tuple[bytes, dict]:
    boundary = "----lds-auth-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"scene.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def auth_app(app_engine):
    server = start_app(app_engine, auth=[(USER, PASSWORD)])
    yield server
    server.app.close()


def routes(url: str, api_names: list[str]) -> dict[str, tuple[str, bytes | None, dict]]:
    """name -> (url, body, headers): the page's data, the API, files, uploads and the queue."""
    upload, upload_headers = upload_body(EXAMPLE.read_bytes())
    join = json.dumps({"data": ["a red circle"], "fn_index": 0, "session_hash": uuid.uuid4().hex,
                       "event_data": None, "trigger_id": None}).encode()
    json_headers = {"Content-Type": "application/json"}
    found = {
        "config": (f"{url}/config", None, {}),
        "api info": (f"{url}/gradio_api/info", None, {}),
        "openapi": (f"{url}/gradio_api/openapi.json", None, {}),
        "upload": (f"{url}/gradio_api/upload", upload, upload_headers),
        "file": (f"{url}/gradio_api/file={EXAMPLE}", None, {}),
        "queue join": (f"{url}/gradio_api/queue/join", join, json_headers),
    }
    for name in api_names:
        found[f"call {name}"] = (f"{url}/gradio_api/call/{name.lstrip('/')}", json.dumps({"data": []}).encode(),
                                 json_headers)
    return found


def test_every_route_refuses_without_a_login_and_works_with_one(auth_app):
    from gradio_client import Client

    client = Client(auth_app.url, auth=(USER, PASSWORD), verbose=False)
    api_names = sorted(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert len(api_names) >= 20 and "/txt2img" in api_names and "/finetune" in api_names
    opener = logged_in(auth_app.url)
    for name, (url, body, headers) in routes(auth_app.url, api_names).items():
        status, text = get(url, data=body, headers=headers)
        assert status == 401, (name, status, text[:200])
        status, text = get(url, opener, data=body, headers=headers)
        assert status == 200, (name, status, text[:200])
    status, page = get(auth_app.url + "/")
    assert "txt2img-prompt" not in page and "Shapes" not in page  # the page: a login form, nothing of the app
    status, page = get(auth_app.url + "/", opener)
    assert status == 200 and "txt2img-prompt" in page  # logged in, the page carries the app's config
    bad = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": USER, "password": "wrong"}).encode()
    assert get(f"{auth_app.url}/login", bad, form, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 400
    assert get(f"{auth_app.url}/config", bad)[0] == 401


def test_gradio_client_needs_the_credentials(auth_app, images):
    from gradio_client import Client, handle_file

    # gradio_client's refusals (AuthenticationError, "Could not login/fetch config") are ValueErrors
    with pytest.raises(ValueError):
        Client(auth_app.url, verbose=False)
    with pytest.raises(ValueError):
        Client(auth_app.url, auth=(USER, "wrong"), verbose=False)
    client = Client(auth_app.url, auth=(USER, PASSWORD), verbose=False)
    preview, gallery, params, status = client.predict(prompt="a red circle", width=64, height=64, **common_args(),
                                                      api_name="/txt2img")
    assert status.startswith("Done") and os.path.isfile(gallery[0]["image"])  # downloaded through the file route
    result = client.predict(image=handle_file(str(images["scene.png"])), style="glow", prompt="a circle",
                            strength=0.6, mode="img2img", control="canny", conditioning_scale=1.0,
                            **common_args(), api_name="/style")  # an upload, then the queue
    assert result[3].startswith("Done")
