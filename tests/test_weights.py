"""The weights manager against a local HTTP server on 127.0.0.1 serving real bytes. No test reaches the internet."""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import json
import os
import threading
import time

import pytest
from click.testing import CliRunner

from deid import cli, weights
from deid.errors import WeightsError
from tests.ranks import OWN_PROCESSES

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB of known bytes


class FileServer:
    """Serves `files` (path -> bytes) with HTTP Range support; `drop_once` paths are cut mid-file once; with
    `chunk_delay` (seconds), bodies go out in 64 KiB chunks that far apart (a slow network)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        self.chunk_delay = 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.drop_once:
                    server.drop_once.discard(self.path)
                    self.wfile.write(body[start : start + len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for offset in range(start, len(body), 1 << 16):
                    self.wfile.write(body[offset : offset + (1 << 16)])
                    time.sleep(server.chunk_delay)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("DEID_OFFLINE", "0")
    monkeypatch.setattr(weights, "BACKOFF_SECONDS", 0.01)


def register(monkeypatch, server, name="test-net", sha256=None, sha256_prefix=None, path="/net.pt", kind="file"):
    entry = weights.WeightsEntry(name, "a test network", "net.pt", (server.url + path,), sha256=sha256,
                                 sha256_prefix=sha256_prefix, kind=kind)
    monkeypatch.setitem(weights.REGISTRY, name, entry)
    return entry


def test_good_download_lands_in_cache_with_recorded_hash(server, online, monkeypatch, _isolated_deid_home):
    server.files["/net.pt"] = PAYLOAD
    register(monkeypatch, server, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    path = weights.fetch("test-net")
    assert path == _isolated_deid_home / "weights" / "test-net" / "net.pt"
    assert path.read_bytes() == PAYLOAD
    record = weights.read_index()["test-net"]
    assert record["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert record["published_hash_matched"] is True
    assert not list(path.parent.glob("*.part"))
    assert weights.resolve("test-net") == path


def test_dropped_connection_is_resumed_with_a_range_request(server, online, monkeypatch):
    server.files["/net.pt"] = PAYLOAD
    server.drop_once.add("/net.pt")
    register(monkeypatch, server)
    path = weights.fetch("test-net")
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0] == ("/net.pt", None)
    assert server.requests[1] == ("/net.pt", f"bytes={len(PAYLOAD) // 3}-")
    assert len(server.requests) == 2


def test_checksum_mismatch_rejects_the_file_and_leaves_nothing(server, online, monkeypatch, _isolated_deid_home):
    server.files["/net.pt"] = PAYLOAD
    register(monkeypatch, server, sha256="0" * 64)
    with pytest.raises(WeightsError, match="does not match the published"):
        weights.fetch("test-net")
    leftovers = [p for p in (_isolated_deid_home / "weights").rglob("*")
                 if p.is_file() and p.name != "index.json" and p.suffix != ".lock"]  # (empty lock files stay)
    assert leftovers == []
    assert "test-net" not in weights.read_index()


def test_hash_prefix_in_file_name_is_checked(server, online, monkeypatch):
    server.files["/net.pt"] = PAYLOAD
    good = hashlib.sha256(PAYLOAD).hexdigest()[:8]
    register(monkeypatch, server, sha256_prefix=good)
    weights.fetch("test-net")
    register(monkeypatch, server, name="bad-net", sha256_prefix="ffffffff" if good != "ffffffff" else "00000000")
    with pytest.raises(WeightsError, match="rejected"):
        weights.fetch("bad-net")


def test_changed_file_is_refused_against_the_hash_recorded_at_first_download(server, online, monkeypatch):
    server.files["/net.pt"] = PAYLOAD
    register(monkeypatch, server)
    path = weights.fetch("test-net")
    path.unlink()
    server.files["/net.pt"] = PAYLOAD[::-1]
    with pytest.raises(WeightsError, match="recorded at first download"):
        weights.fetch("test-net")
    assert not path.exists()


def test_404_fails_at_once_naming_url_and_manual_route(server, online, monkeypatch):
    register(monkeypatch, server, path="/missing.pt")
    with pytest.raises(WeightsError) as err:
        weights.fetch("test-net")
    message = str(err.value)
    assert "HTTP 404" in message and server.url + "/missing.pt" in message
    assert "deid weights import test-net FILE" in message
    assert len(server.requests) == 1  # a 4xx is not retried


def test_offline_mode_never_touches_the_network(server, monkeypatch):
    monkeypatch.setenv("DEID_OFFLINE", "1")
    server.files["/net.pt"] = PAYLOAD
    register(monkeypatch, server)
    with pytest.raises(WeightsError, match="offline") as err:
        weights.resolve("test-net")
    assert "deid weights fetch test-net" in str(err.value)
    assert server.requests == []


def test_offline_flag_on_the_cli(server, monkeypatch):
    monkeypatch.setenv("DEID_OFFLINE", "0")
    server.files["/net.pt"] = PAYLOAD
    register(monkeypatch, server)
    result = CliRunner().invoke(cli.cli, ["--offline", "weights", "fetch", "test-net"])
    assert result.exit_code != 0
    assert "offline" in str(result.exception)
    assert server.requests == []


def test_import_registers_a_hand_downloaded_file_and_verify_catches_corruption(tmp_path, monkeypatch, server):
    register(monkeypatch, server)
    source = tmp_path / "download.pt"
    source.write_bytes(PAYLOAD)
    dest = weights.import_file("test-net", source)
    assert dest.read_bytes() == PAYLOAD and source.exists()
    assert weights.resolve("test-net") == dest
    state = {s.name: s.state for s in weights.statuses(rehash=True)}
    assert state["test-net"] == "present"
    with open(dest, "r+b") as f:  # same size, one byte flipped: only a re-hash sees it
        f.seek(1000)
        f.write(b"\xff" if PAYLOAD[1000] != 0xFF else b"\x00")
    state = {s.name: s.state for s in weights.statuses(rehash=False)}
    assert state["test-net"] == "present"
    state = {s.name: s.state for s in weights.statuses(rehash=True)}
    assert state["test-net"] == "corrupt"
    result = CliRunner().invoke(cli.cli, ["weights", "verify"])
    assert result.exit_code != 0 and "test-net" in str(result.exception)


def test_import_refuses_a_file_whose_published_hash_differs(tmp_path, monkeypatch, server):
    register(monkeypatch, server, sha256="1" * 64)
    source = tmp_path / "download.pt"
    source.write_bytes(PAYLOAD)
    with pytest.raises(WeightsError, match="does not match"):
        weights.import_file("test-net", source)
    assert not weights.cache_path("test-net").exists()


def test_resolve_random_paths_and_unknown_names(tmp_path):
    assert weights.resolve("random") is None
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    assert weights.resolve(f) == f
    assert weights.resolve(str(f)) == f
    with pytest.raises(WeightsError, match="not a known network|neither a file"):
        weights.resolve("stylegan9")
    with pytest.raises(WeightsError, match="no such file"):
        weights.resolve(str(tmp_path / "missing.pkl"))


def test_trained_model_entry_explains_how_to_make_one():
    with pytest.raises(WeightsError) as err:
        weights.resolve("deid-ffhq256")
    assert "deid make-dataset" in str(err.value) and "deid train" in str(err.value)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEID_HOME", str(tmp_path / "a"))
    assert weights.weights_home() == tmp_path / "a"
    monkeypatch.delenv("DEID_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert weights.weights_home() == tmp_path / "x" / "deid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert weights.weights_home() == tmp_path / "h" / ".cache" / "deid"


def test_list_shows_every_design_network_as_missing_with_the_fetch_command(monkeypatch):
    from deid.console import console

    # wide enough for the fetch command on one line; COLUMNS alone is not read by a console made while it was set
    # (pytest-xdist's workers start with COLUMNS=80)
    monkeypatch.setattr(console, "_width", 250)
    result = CliRunner().invoke(cli.cli, ["weights", "list"])
    assert result.exit_code == 0, result.output
    for name in ("stylegan2-ffhq-256", "stylegan2-ffhq-256-ngc", "stylegan2-ffhq-1024", "facenet-vggface2",
                 "inception-v3-imagenet", "fan-2d", "deid-ffhq256", "mtcnn"):
        assert name in result.output
    assert result.output.count("missing") == len(weights.REGISTRY)
    assert "deid weights fetch stylegan2-ffhq-256" in result.output
    assert "bundled" in result.output  # MTCNN ships inside facenet-pytorch


def test_convert_writes_a_safetensors_generator_with_the_same_fingerprint(tmp_path, tiny_generator, tiny_generator_file):
    from deid.stylegan.loading import load_generator

    source = tiny_generator_file
    out = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(cli.cli, ["weights", "convert", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert load_generator(out).fingerprint == tiny_generator.fingerprint
    again = CliRunner().invoke(cli.cli, ["weights", "convert", str(source), str(out)])
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)


def _fetch_in_process(home: str, entry: weights.WeightsEntry, start, results) -> None:
    """One separate `deid` process: fetch `entry` into the cache at `home` once `start` lets every process go."""
    import os

    os.environ.update(DEID_HOME=home, DEID_OFFLINE="0")
    weights.REGISTRY[entry.name] = entry
    start.wait()
    results.put(str(weights.fetch(entry.name)))


@OWN_PROCESSES
@pytest.mark.slow
def test_two_processes_fetching_one_entry_leave_one_correct_file_and_index(server, _isolated_deid_home):
    """Without the cache lock both processes write the same .part file (and record whatever hash they read)."""
    import multiprocessing

    server.files["/net.pt"] = PAYLOAD
    server.chunk_delay = 0.02  # 16 slow chunks: the two downloads would overlap
    entry = weights.WeightsEntry("test-net", "a test network", "net.pt", (server.url + "/net.pt",))  # no published hash
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_fetch_in_process, args=(str(_isolated_deid_home), entry, start, results)) for _ in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    paths = {results.get(timeout=5) for _ in processes}
    path = _isolated_deid_home / "weights" / "test-net" / "net.pt"
    assert paths == {str(path)} and path.read_bytes() == PAYLOAD
    assert [r for r in server.requests if r[0] == "/net.pt"] == [("/net.pt", None)]  # one download, not two
    record = json.loads((_isolated_deid_home / "weights" / "index.json").read_text())["test-net"]
    assert record["sha256"] == hashlib.sha256(PAYLOAD).hexdigest() and record["bytes"] == len(PAYLOAD)
    assert not list(path.parent.glob("*.part"))


@pytest.mark.parametrize("failure, words", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")])
def test_a_full_disk_or_a_permission_error_is_not_retried_and_names_the_path(server, online, monkeypatch, failure, words):
    import builtins

    server.files["/net.pt"] = PAYLOAD
    register(monkeypatch, server)
    real_open = builtins.open

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(".part") and mode[0] in "wa":
            if failure == errno.EACCES:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return FullDisk()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(weights, "open", fake_open, raising=False)
    with pytest.raises(WeightsError) as info:
        weights.fetch("test-net")
    message = str(info.value)
    assert words in message and str(weights.cache_path("test-net")) in message and "network" not in message
    assert len(server.requests) == 1  # not retried
