"""Weight downloads (fastig.models.download, `fastig fetch-weights`, weights="auto") against a local HTTP server on
127.0.0.1 only: right hash, wrong hash, truncated, 404, slow, stalled. The server answers at most MAX_REQUESTS
requests and shuts itself down after SERVER_LIFETIME seconds whatever happens."""

import dataclasses
import hashlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from click.testing import CliRunner

from fastig import models
from fastig.cli import cli
from fastig.errors import CheckpointError
from fastig.models import download
from fastig.models.download import Remote

from _shared import SmallCNN
from test_dvae import _small_standins, standin

MAX_REQUESTS = 40
SERVER_LIFETIME = 60.0
PAYLOAD = bytes(range(256)) * 1000  # 256 kB


class _Files(BaseHTTPRequestHandler):
    routes: dict = {}
    counter = {"requests": 0}

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.counter["requests"] += 1
        if self.counter["requests"] > MAX_REQUESTS:
            self.send_error(503, "request budget of the test server spent")
            return
        kind, data = self.routes.get(self.path, ("missing", b""))
        if kind == "missing":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) * (2 if kind == "truncated" else 1)))
        self.end_headers()
        if kind == "stall":
            self.wfile.write(data[:1000])
            self.wfile.flush()
            time.sleep(1.5)  # longer than the client's timeout
            return
        pieces = 4 if kind == "slow" else 1
        step = -(-len(data) // pieces)
        for start in range(0, len(data), step):
            self.wfile.write(data[start:start + step])
            self.wfile.flush()
            if kind == "slow":
                time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Files.routes, _Files.counter = {}, {"requests": 0}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    guard = threading.Timer(SERVER_LIFETIME, httpd.shutdown)
    guard.daemon = True
    guard.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, _Files.routes, _Files.counter
    finally:
        guard.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("FASTIG_OFFLINE", raising=False)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_right_hash_is_kept_and_nothing_else_is_left(server, online, tmp_path):
    base, routes, _ = server
    routes["/good.bin"] = ("ok", PAYLOAD)
    for known in (_sha(PAYLOAD)[:8], _sha(PAYLOAD), None):
        path, sha = download.download(Remote(f"{base}/good.bin", "good.bin", known), tmp_path, show=False)
        assert path.read_bytes() == PAYLOAD and sha == _sha(PAYLOAD)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["good.bin"]
        path.unlink()


@pytest.mark.parametrize("kind,sha,message", [
    ("ok", "0badc0de", "does not start with the expected '0badc0de'"),
    ("truncated", None, "truncated: got 256000 of 512000 bytes"),
    ("missing", None, "HTTP 404"),
    ("stall", None, "timed out"),
])
def test_bad_downloads_never_become_checkpoints(server, online, tmp_path, kind, sha, message):
    base, routes, _ = server
    routes["/file.pth"] = (kind, PAYLOAD)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        download.download(Remote(f"{base}/file.pth", "file.pth", sha), tmp_path, timeout=0.3, show=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one
    assert time.perf_counter() - started < 5


def test_slow_download_completes_with_progress(server, online, tmp_path, capsys, monkeypatch):
    base, routes, counter = server
    routes["/slow.bin"] = ("slow", PAYLOAD)
    path, _ = download.download(Remote(f"{base}/slow.bin", "slow.bin"), tmp_path, timeout=2.0)
    assert path.read_bytes() == PAYLOAD
    assert "downloading slow.bin: 250/250 KiB (100%)" in capsys.readouterr().err
    monkeypatch.setenv("FASTIG_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="downloads are off"):
        download.download(Remote(f"{base}/slow.bin", "again.bin"), tmp_path, show=False)
    assert counter["requests"] == 1


@pytest.fixture
def tiny_model(server, monkeypatch, tmp_path):
    """A zoo entry whose torchvision-style file name carries the hash prefix of what the server serves."""
    base, routes, counter = server
    buffer = io.BytesIO()
    torch.manual_seed(4)
    torch.save(SmallCNN().state_dict(), buffer)
    data = buffer.getvalue()
    filename = f"tiny-{_sha(data)[:8]}.pth"
    routes[f"/{filename}"] = ("ok", data)
    info = dataclasses.replace(models.info("resnet18"), name="tiny", filename=filename, url=f"{base}/{filename}",
                               sha256=_sha(data)[:8], input_size=8, resize_size=8, num_classes=5, builder=SmallCNN)
    monkeypatch.setitem(models._REGISTRY, "tiny", info)
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path / "ckpt"))
    return filename, counter


def test_weights_auto_downloads_once_and_offline_keeps_the_old_error(tiny_model, monkeypatch, tmp_path):
    filename, counter = tiny_model
    with pytest.raises(CheckpointError, match=f"needs its weight file '{filename}'.*downloads are off"):
        models.get("tiny")  # FASTIG_OFFLINE=1 (the test suite's default)
    assert counter["requests"] == 0
    monkeypatch.delenv("FASTIG_OFFLINE")
    model = models.get("tiny")
    torch.manual_seed(4)
    expected = SmallCNN().state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    models.get("tiny")  # now the file is there: no second download
    assert counter["requests"] == 1 and (tmp_path / "ckpt" / filename).is_file()


def test_fetch_weights_cli(tiny_model, monkeypatch, tmp_path):
    filename, counter = tiny_model
    runner = CliRunner()
    offline = runner.invoke(cli, ["fetch-weights", "tiny"])
    assert offline.exit_code == 2 and "downloads are off" in offline.output
    monkeypatch.delenv("FASTIG_OFFLINE")
    result = runner.invoke(cli, ["fetch-weights", "tiny"])
    assert result.exit_code == 0, result.output
    assert "checked: sha256 prefix" in result.output and (tmp_path / "ckpt" / filename).is_file()
    again = runner.invoke(cli, ["fetch-weights", "tiny"])
    assert "already there" in again.output and counter["requests"] == 1
    unknown = runner.invoke(cli, ["fetch-weights", "resnet99"])
    assert unknown.exit_code == 2 and "unknown weights 'resnet99'" in unknown.output
    assert "centerpixel" not in download.names() and "dvae" in download.names()


def test_dvae_pickles_are_fetched_then_converted_safely(server, online, monkeypatch, tmp_path):
    base, routes, _ = server
    with standin() as dall_e:
        encoder, decoder = _small_standins(dall_e, n_blk=1)
        for name, module in (("encoder.pkl", encoder), ("decoder.pkl", decoder)):
            buffer = io.BytesIO()
            torch.save(module, buffer)
            routes[f"/dall-e/{name}"] = ("ok", buffer.getvalue())
    monkeypatch.setattr("fastig.attr.latent_ig.OPENAI_URL", f"{base}/dall-e/")
    lines = []
    written = download.fetch("dvae", tmp_path, echo=lines.append, show=False)
    assert [p.name for p in written] == ["dvae_encoder.pt", "dvae_decoder.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvae_decoder.pt", "dvae_encoder.pt"]
    assert any("no published hash" in line for line in lines)
    from fastig.models.dvae import load_encoder

    loaded = load_encoder(written[0])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in encoder.state_dict().items())
