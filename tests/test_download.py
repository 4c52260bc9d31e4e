"""End-to-end tests for download.sh against a fake signed download server.

Each test starts an HTTP server on 127.0.0.1 that serves a tiny random
Llama 2 tree behind a CloudFront-style signed URL and then runs the real
script with subprocess.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "download.sh"
BASH = shutil.which("bash")
WGET = shutil.which("wget")
CURL = shutil.which("curl")
needs_wget = pytest.mark.skipif(WGET is None, reason="wget not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")

SIGNATURE = {"Policy": "eyJTdGF0ZW1lbnQiOlt7fV19", "Signature": "c2lnbmVk~x-y_z",
             "Key-Pair-Id": "K2TESTKEYPAIR"}
SHARDS = {"7b": 1, "13b": 2, "70b": 8}
ALL_MODELS = ["7b", "7b-chat", "13b", "13b-chat", "70b", "70b-chat"]
TOP_LEVEL = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]
# External tools download.sh needs besides wget/curl (for the curl-only PATH).
TOOLS = ["bash", "awk", "cat", "head", "md5sum", "mkdir", "mktemp", "mv", "rm",
         "sleep", "tr", "wc"]


def model_files(model):
    shards = SHARDS[model.split("-")[0]]
    names = [f"consolidated.{i:02d}.pth" for i in range(shards)]
    return names + ["params.json", "checklist.chk"]


def expected_paths(models):
    paths = set(TOP_LEVEL)
    for m in models:
        paths |= {f"llama-2-{m}/{f}" for f in model_files(m)}
    return paths


def checklist(folder_files):
    return "".join(f"{hashlib.md5(data).hexdigest()}  {name}\n"
                   for name, data in folder_files.items()).encode()


def make_tree():
    """Random fake release: {remote path: bytes}, with md5 checklists."""
    tree = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
        "tokenizer.model": os.urandom(1500),
    }
    tree["tokenizer_checklist.chk"] = checklist({"tokenizer.model": tree["tokenizer.model"]})
    for m in ALL_MODELS:
        folder = {name: os.urandom(2048 + 7 * i)
                  for i, name in enumerate(model_files(m)[:-2])}
        folder["params.json"] = json.dumps({"dim": 64, "n_layers": 2}).encode()
        for name, data in folder.items():
            tree[f"llama-2-{m}/{name}"] = data
        tree[f"llama-2-{m}/checklist.chk"] = checklist(folder)
    return tree


class FakeServer:
    """Serves `files` behind the signed URL; knobs for failure injection."""

    def __init__(self):
        self.files = make_tree()
        self.served = {}          # path -> bytes served instead of the real file
        self.forbidden = set()    # paths answered with 403
        self.drop_once = set()    # paths whose first GET stops half-way
        self.requests = []        # (path, Range header, User-Agent)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        port = self.httpd.server_address[1]
        query = "&".join(f"{k}={v}" for k, v in SIGNATURE.items())
        self.url = f"http://127.0.0.1:{port}/*?{query}"

    def paths_requested(self):
        return [p for p, _, _ in self.requests]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                path = parts.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((path, rng, self.headers.get("User-Agent", "")))
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if query != SIGNATURE or path in server.forbidden:
                    return self.reply(403, b"<Error><Code>AccessDenied</Code></Error>",
                                      "application/xml")
                if path not in server.files:
                    return self.reply(404, b"not found", "text/plain")
                data = server.served.get(path, server.files[path])
                if rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        return self.reply(416, b"", extra={"Content-Range": f"bytes */{len(data)}"})
                    return self.reply(206, data[start:], extra={
                        "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                if path in server.drop_once:
                    server.drop_once.discard(path)
                    # Announce the whole file, send half, then hang up.
                    return self.reply(200, data, send=len(data) // 2)
                self.reply(200, data)

            def reply(self, code, body, ctype="application/octet-stream", extra=None, send=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:send])
                self.close_connection = True

        return Handler


@pytest.fixture
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def run(args=(), stdin="", env=None, cwd=None, downloader=None):
    """Run download.sh with a clean LLAMA_* environment and no proxies."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("LLAMA_") and "proxy" not in k.lower()}
    full_env["LLAMA_RETRY_WAIT"] = "0"
    if downloader:
        full_env["LLAMA_DOWNLOADER"] = downloader
    full_env.update(env or {})
    return subprocess.run([BASH, str(SCRIPT), *args], input=stdin, env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def files_under(root):
    return {p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()}


def assert_complete(server, target, models):
    assert files_under(target) == expected_paths(models)
    for rel in expected_paths(models):
        assert (target / rel).read_bytes() == server.files[rel], rel


def test_help_lists_flags_and_env_vars():
    result = run(["--help"])
    assert result.returncode == 0
    for word in ["--url", "--models", "--target-dir", "LLAMA_DOWNLOAD_URL", "LLAMA_MODELS",
                 "LLAMA_TARGET_DIR", "LLAMA_DOWNLOADER", "LLAMA_RETRY_WAIT"]:
        assert word in result.stdout


@needs_wget
def test_7b_with_wget_via_flags(server, tmp_path):
    target = tmp_path / "my weights"  # a space, to catch quoting mistakes
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(target)],
                 downloader="wget")
    assert result.returncode == 0, result.stderr
    assert_complete(server, target, ["7b"])
    assert "llama-2-7b/consolidated.00.pth" in result.stderr.split("Verified")[-1]
    assert all(ua.startswith("Wget/") for _, _, ua in server.requests)


def test_13b_via_prompts_into_current_dir(server, tmp_path):
    result = run(stdin=f"{server.url}\n13B\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_complete(server, tmp_path, ["13b"])


def test_all_models_when_enter_pressed(server, tmp_path):
    result = run(stdin=f"{server.url}\n\n", env={"LLAMA_TARGET_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert_complete(server, tmp_path, ALL_MODELS)


def test_env_vars_run_unattended(server, tmp_path):
    env = {"LLAMA_DOWNLOAD_URL": server.url, "LLAMA_MODELS": "7b-chat, 7B",
           "LLAMA_TARGET_DIR": str(tmp_path)}
    result = run(env=env)
    assert result.returncode == 0, result.stderr
    assert_complete(server, tmp_path, ["7b", "7b-chat"])


def test_unknown_model_rejected_before_download(server, tmp_path):
    result = run(["--url", server.url, "--models", "7B,8B", "--target-dir", str(tmp_path)])
    assert result.returncode != 0
    assert "8b" in result.stderr
    assert "7B,13B,70B,7B-chat,13B-chat,70B-chat" in result.stderr
    assert server.requests == []
    assert files_under(tmp_path) == set()


def test_403_says_link_expired(server, tmp_path):
    server.forbidden.add("llama-2-7b/consolidated.00.pth")
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)])
    assert result.returncode != 0
    assert "403" in result.stderr and "expired" in result.stderr
    assert "used up" in result.stderr
    assert not any(p.startswith("llama-2-7b/consolidated") for p in files_under(tmp_path))


def test_wrong_signature_gets_403(server, tmp_path):
    url = server.url.replace(SIGNATURE["Signature"], "tampered")
    result = run(["--url", url, "--models", "7B", "--target-dir", str(tmp_path)])
    assert result.returncode != 0
    assert "expired" in result.stderr
    assert not (tmp_path / "LICENSE").exists()


def test_corrupted_file_is_set_aside_then_redownloaded(server, tmp_path):
    shard = "llama-2-7b/consolidated.00.pth"
    server.served[shard] = os.urandom(len(server.files[shard]))
    args = ["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)]
    result = run(args)
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr and shard in result.stderr
    assert not (tmp_path / shard).exists()
    assert (tmp_path / f"{shard}.bad").exists()

    # Once the server is fixed, a rerun fetches only the bad shard again.
    del server.served[shard]
    server.requests.clear()
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert server.paths_requested() == [shard]
    assert (tmp_path / shard).read_bytes() == server.files[shard]


@pytest.mark.parametrize("downloader", [
    pytest.param("wget", marks=needs_wget), pytest.param("curl", marks=needs_curl)])
def test_dropped_connection_is_resumed(server, tmp_path, downloader):
    shard = "llama-2-13b/consolidated.01.pth"
    server.drop_once.add(shard)
    result = run(["--url", server.url, "--models", "13B", "--target-dir", str(tmp_path)],
                 downloader=downloader)
    assert result.returncode == 0, result.stderr
    half = len(server.files[shard]) // 2
    assert (shard, f"bytes={half}-") in [(p, r) for p, r, _ in server.requests]
    assert_complete(server, tmp_path, ["13b"])


@pytest.mark.parametrize("downloader", [
    pytest.param("wget", marks=needs_wget), pytest.param("curl", marks=needs_curl)])
@pytest.mark.parametrize("kept", ["half", "all"])
def test_part_file_from_interrupted_run_is_resumed(server, tmp_path, downloader, kept):
    shard = "llama-2-7b/consolidated.00.pth"
    data = server.files[shard]
    part = data[: len(data) // 2] if kept == "half" else data
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / f"{shard}.part").write_bytes(part)
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)],
                 downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert (shard, f"bytes={len(part)}-") in [(p, r) for p, r, _ in server.requests]
    assert_complete(server, tmp_path, ["7b"])


def test_html_left_by_an_older_script_is_replaced(server, tmp_path):
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / "llama-2-7b/checklist.chk").write_text("<html><body>Denied</body></html>")
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path) == expected_paths(["7b"]) | {"llama-2-7b/checklist.chk.bad"}


def test_html_page_instead_of_weights_is_caught(server, tmp_path):
    shard = "llama-2-7b/consolidated.00.pth"
    server.served[shard] = b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n"
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)])
    assert result.returncode != 0
    assert "HTML" in result.stderr and shard in result.stderr
    assert not (tmp_path / shard).exists()


def tool_dir(tmp_path, tools):
    """A folder of symlinks to just `tools`, to be used as the whole PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


@needs_curl
def test_curl_used_when_wget_missing(server, tmp_path):
    target = tmp_path / "weights"
    path = tool_dir(tmp_path, TOOLS + ["curl"])
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(target)],
                 env={"PATH": path})
    assert result.returncode == 0, result.stderr
    assert_complete(server, target, ["7b"])
    assert server.requests and all(ua.startswith("curl/") for _, _, ua in server.requests)


@needs_curl
def test_macos_md5_used_without_md5sum(server, tmp_path):
    # Stand-in for macOS `md5 -r`, which prints just the digest for stdin.
    path = tool_dir(tmp_path, [t for t in TOOLS if t != "md5sum"] + ["curl"])
    shim = Path(path) / "md5"
    shim.write_text(f'#!{BASH}\n[ "$1" = -r ] || exit 2\n'
                    f'{shutil.which("md5sum")} | {{ read -r sum _; echo "$sum"; }}\n')
    shim.chmod(0o755)
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path / "w")],
                 env={"PATH": path})
    assert result.returncode == 0, result.stderr
    assert_complete(server, tmp_path / "w", ["7b"])


@needs_wget
def test_wget_preferred_by_default(server, tmp_path):
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert all(ua.startswith("Wget/") for _, _, ua in server.requests)


def test_clear_error_without_wget_or_curl(server, tmp_path):
    result = run(["--url", server.url, "--models", "7B", "--target-dir", str(tmp_path)],
                 env={"PATH": tool_dir(tmp_path, TOOLS)})
    assert result.returncode != 0
    assert "neither wget nor curl" in result.stderr
    assert server.requests == []


@pytest.mark.parametrize("downloader, reason", [
    pytest.param("wget", "Connection refused", marks=needs_wget),
    pytest.param("curl", "could not connect to the server", marks=needs_curl)])
def test_no_response_says_why_in_the_downloaders_words(server, tmp_path, downloader, reason):
    """A refused connection (as a wrong proxy or DNS failure gives no HTTP status either) is named, not shown as
    'last HTTP status: -'."""
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", server.url)
    result = run(["--url", url, "--models", "7B", "--target-dir", str(tmp_path)], downloader=downloader,
                 env={"LLAMA_TRIES": "2"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "no response from the server" in last and reason in last and "proxy" in last, last
    assert "HTTP status: -" not in result.stderr
