"""Check that this repository comes up as a Hugging Face Space, started the way Spaces start it.

    python -m scripts.check_space                       # HEAD's files, a fresh venv, the app on this machine's address
    python -m scripts.check_space --reuse-venv DIR      # skip the install: DIR is a venv this check made before
    python -m scripts.check_space --export DIR          # also leave the checked file set in DIR, ready to push
    python -m scripts.check_space --model shapes-v2     # with a Space variable LDS_MODEL=shapes-v2

What it does, each step printing PASS or FAIL:
1. the file set a push sends: the files of the commit (`git archive HEAD`; `--worktree` takes the tracked files as
   they are on disk instead), unpacked into a fresh folder;
2. the Space configuration: README front matter (sdk gradio, sdk_version, python_version, app_file present),
   requirements.txt, and a .gitattributes that puts the weights and every other binary file in git LFS;
3. the Hub's limits: no file outside LFS above 10 MB and no binary file outside LFS (the Hub refuses both), no
   LFS file of 5 GB or more, the whole set under 1 GB (a Space clones it on every build; hub weights belong on
   the Hub, LDS_MODEL=sd15, not in the Space);
4. a clean environment as the Space builds it: `python -m venv`, then `pip install gradio==<sdk_version>
   -r requirements.txt` (pip's own cache applies; timed);
5. `python app.py` in the file set with Spaces' variables (SPACE_ID, SPACE_HOST, SYSTEM=spaces,
   GRADIO_SERVER_NAME=0.0.0.0, GRADIO_SERVER_PORT) and nothing of this shell's LDS_* settings;
6. /txt2img through gradio_client on this machine's own network address, where a Space's proxy connects
   (not 127.0.0.1), and the image it returns.
Exit status 0 when every step passes.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB, GB = 1024 ** 2, 1024 ** 3
NON_LFS_MAX_BYTES = 10 * MB  # the Hub refuses larger files that are not in LFS
LFS_MAX_BYTES = 5 * GB  # larger LFS files need `huggingface-cli lfs-enable-largefiles`
TOTAL_MAX_BYTES = 1 * GB  # this app's own bound: a Space clones its repository on every build
BINARY_SNIFF_BYTES = 8000  # git's own test: a NUL byte in the first 8000 bytes means binary
REQUIRED_FRONT_MATTER = ("sdk", "sdk_version", "app_file", "python_version")
START_TIMEOUT_S = 300  # a Space that is not up within this long would show "Starting" for good
SPACE_ID = "check/latent-diffusion-studio"


@dataclass
class Report:
    lines: list[tuple[bool, str]] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        self.lines.append((bool(ok), what))
        print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
        return bool(ok)

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.lines)


# --- 1. the file set ----------------------------------------------------------------------------------------------

def export_files(target: Path, *, worktree: bool) -> list[str]:
    """Write the files a push sends into `target`; returns their paths relative to it."""
    target.mkdir(parents=True, exist_ok=True)
    if worktree:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
        files = [n for n in names.decode().split("\0") if n and (REPO / n).is_file()]
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
        return sorted(files)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
        return sorted(m.name for m in tar.getmembers() if m.isfile())


# --- 2. configuration ------------------------------------------------------------------------------------------------

def front_matter(readme: Path) -> dict[str, str]:
    """The `key: value` lines between the leading `---` lines of a Space README."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    values = {}
    for line in lines[1:]:
        if line.strip() == "---":
            return values
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return {}


def lfs_tracked(root: Path, files: list[str]) -> set[str]:
    """The files `root`'s .gitattributes put in LFS (git's own attribute matching, in a scratch repository)."""
    scratch = Path(tempfile.mkdtemp(prefix="lds-attr-"))
    try:
        subprocess.run(["git", "init", "-q", str(scratch)], check=True)
        for attributes in root.rglob(".gitattributes"):
            destination = scratch / attributes.relative_to(root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(attributes, destination)
        out = subprocess.run(["git", "check-attr", "filter", "--stdin", "-z"], cwd=scratch, check=True,
                             input="\0".join(files).encode(), capture_output=True).stdout.decode().split("\0")
        # -z output: path, attribute, value, path, attribute, value, ...
        return {out[i] for i in range(0, len(out) - 2, 3) if out[i + 2] == "lfs"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def check_limits(root: Path, files: list[str], report: Report) -> None:
    """Step 3: the Hub's size rules and LFS for binaries."""
    lfs = lfs_tracked(root, files)
    sizes = {name: (root / name).stat().st_size for name in files}
    too_big = [f"{n} ({sizes[n] / MB:.1f} MB)" for n in files if n not in lfs and sizes[n] > NON_LFS_MAX_BYTES]
    report.check(not too_big, f"no file outside LFS above {NON_LFS_MAX_BYTES // MB} MB"
                 + (f": {', '.join(too_big)}" if too_big else ""))
    binaries = [n for n in files if n not in lfs and is_binary(root / n)]
    report.check(not binaries, "every binary file is in LFS (.gitattributes)"
                 + (f"; not in LFS: {', '.join(binaries[:10])}" if binaries else f" ({len(lfs)} files)"))
    huge = [f"{n} ({sizes[n] / GB:.2f} GB)" for n in lfs if sizes[n] >= LFS_MAX_BYTES]
    report.check(not huge, f"every LFS file below {LFS_MAX_BYTES // GB} GB" + (f": {', '.join(huge)}" if huge else ""))
    total = sum(sizes.values())
    report.check(total < TOTAL_MAX_BYTES, f"the whole set is {total / MB:.1f} MB in {len(files)} files "
                                          f"(limit {TOTAL_MAX_BYTES // MB} MB)")


def check_config(root: Path, files: list[str], report: Report) -> dict[str, str]:
    """Step 2: front matter, requirements, .gitattributes."""
    config = front_matter(root / "README.md") if (root / "README.md").is_file() else {}
    missing = [key for key in REQUIRED_FRONT_MATTER if not config.get(key)]
    report.check(config and not missing, "README front matter has " + ", ".join(REQUIRED_FRONT_MATTER)
                 + (f"; missing: {', '.join(missing)}" if missing else ""))
    report.check(config.get("sdk") == "gradio", f"sdk: {config.get('sdk')!r} (gradio expected)")
    report.check(config.get("app_file", "") in files, f"app_file {config.get('app_file')!r} is in the file set")
    report.check("requirements.txt" in files, "requirements.txt is in the file set")
    report.check(".gitattributes" in files, ".gitattributes is in the file set")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    report.check(config.get("python_version") == here,
                 f"python_version {config.get('python_version')!r} is the Python this check builds with ({here})")
    return config


# --- 4. the environment ----------------------------------------------------------------------------------------------


def build_venv(venv: Path, root: Path, sdk_version: str, report: Report) -> Path | None:
    """A fresh venv with what a Space installs: gradio at the front matter's version, then requirements.txt."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             f"gradio=={sdk_version}", "-r", str(root / "requirements.txt")],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    ok = report.check(result.returncode == 0, f"clean venv: pip install gradio=={sdk_version} -r requirements.txt "
                                              f"({seconds:.0f} s)")
    if not ok:
        print(result.stdout[-3000:] + result.stderr[-3000:])
    return python if ok else None


# --- 5-6. the app, as the Space's proxy sees it ----------------------------------------------------------------------

def host_address() -> str | None:
    """This machine's own address on its network (what `hostname -I` lists first), not a loopback one."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        for address in out:
            if "." in address and not address.startswith("127."):
                return address
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # picks the outgoing interface; no packet is sent
            address = s.getsockname()[0]
            return None if address.startswith("127.") else address
    except OSError:
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def space_env(port: int, address: str, model: str | None = None) -> dict[str, str]:
    """What a Space's container sets, plus this shell's basics; no LDS_* setting of this shell leaks in, only
    `model` as the Space variable LDS_MODEL when given."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "HF_HOME", "HF_HUB_OFFLINE", "PIP_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(SPACE_ID=SPACE_ID, SPACE_AUTHOR_NAME=SPACE_ID.split("/")[0], SPACE_REPO_NAME=SPACE_ID.split("/")[1],
               SPACE_HOST=f"{address}:{port}", SYSTEM="spaces", GRADIO_SERVER_NAME="0.0.0.0",
               GRADIO_SERVER_PORT=str(port), PYTHONUNBUFFERED="1")
    if model:
        env["LDS_MODEL"] = model
    return env


def call_txt2img(url: str, report: Report, model: str | None = None) -> None:
    from gradio_client import Client
    from PIL import Image

    client = Client(url, verbose=False)
    started = time.perf_counter()
    _, gallery, params, status = client.predict(prompt="a red circle left of a blue square", negative_prompt="",
                                                seed=1, steps=10, guidance=2.5, scheduler="DPM++ 2M", width=64,
                                                height=64, batch_size=1, api_name="/txt2img")
    path = gallery[0]["image"] if isinstance(gallery[0], dict) else gallery[0][0]
    with Image.open(path) as image:
        size, has_params = image.size, "parameters" in image.info
    report.check(str(status).startswith("Done") and size == (64, 64) and has_params
                 and params.get("model") == (model or "shapes"),
                 f"/txt2img through gradio_client at {url}: {size[0]}x{size[1]} PNG with its parameters "
                 f"in {time.perf_counter() - started:.1f} s, model {params.get('model')} "
                 f"({str(status).splitlines()[0]})")


def run_app(python: Path, root: Path, report: Report, model: str | None = None) -> None:
    address = host_address()
    report.check(address is not None, f"this machine has a non-loopback address for the proxy: {address}")
    if address is None:
        return
    port = free_port()
    log = root.parent / "app.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([str(python), "app.py"], cwd=root, env=space_env(port, address, model), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{address}:{port}/"
    try:
        up = False
        while time.perf_counter() - started < START_TIMEOUT_S and process.poll() is None:
            try:
                with socket.create_connection((address, port), timeout=2):
                    up = True
                    break
            except OSError:
                time.sleep(0.5)
        report.check(up, f"`python app.py` with Spaces' variables answers at {address}:{port} "
                         f"after {time.perf_counter() - started:.1f} s")
        if up:
            try:
                call_txt2img(url, report, model)
            except Exception as error:  # whatever went wrong is the check's result
                report.check(False, f"/txt2img through gradio_client at {url}: {type(error).__name__}: {error}")
        if not report.passed:
            print("--- app log ---\n" + log.read_text()[-4000:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.check_space", description=__doc__.split("\n")[0])
    parser.add_argument("--worktree", action="store_true", help="the tracked files as they are on disk, not HEAD's")
    parser.add_argument("--reuse-venv", type=Path, metavar="DIR", help="use this venv (made by an earlier check) "
                        "instead of installing a fresh one")
    parser.add_argument("--keep-venv", type=Path, metavar="DIR", help="build the fresh venv here and keep it")
    parser.add_argument("--export", type=Path, metavar="DIR", help="leave the checked file set in DIR")
    parser.add_argument("--model", metavar="PRESET", help="start the app with the Space variable LDS_MODEL=PRESET")
    args = parser.parse_args(argv)
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="lds-space-check-"))
    try:
        root = work / "space"
        files = export_files(root, worktree=args.worktree)
        report.check(bool(files), f"file set of {'the working tree' if args.worktree else 'HEAD'}: {len(files)} files")
        config = check_config(root, files, report)
        check_limits(root, files, report)
        if report.passed:
            if args.reuse_venv:
                python = args.reuse_venv / "bin" / "python"
                report.check(python.is_file(), f"reusing the venv {args.reuse_venv} (not a fresh install)")
            else:
                venv = args.keep_venv or work / "venv"
                if venv.exists():
                    shutil.rmtree(venv)
                python = build_venv(venv, root, config["sdk_version"], report)
            if report.passed and python is not None:
                run_app(python, root, report, args.model)
        if args.export:
            shutil.copytree(root, args.export, dirs_exist_ok=True)
            print(f"file set left in {args.export}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'PASS' if report.passed else 'FAIL'}: {sum(ok for ok, _ in report.lines)}/{len(report.lines)} checks passed"
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
