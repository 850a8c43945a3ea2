"""Locating, downloading and checking the PTB word files (only 127.0.0.1 is ever contacted)."""
import hashlib
import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from flipout_lstm.data import PTB_SHA256, PTB_URL, prepare_ptb
from flipout_lstm.data.ptb import read_split_text, resolve_root
from flipout_lstm.errors import DataError, UserError

NAMES = ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"]
SYNTH = {
    "ptb.train.txt": b" the cat sat \n the dog <unk> \n",
    "ptb.valid.txt": b" the cat \n",
    "ptb.test.txt": b" a dog sat \n",
}


def sums_of(files):
    return {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}


def make_tgz(files, extra=()):
    """A gzip tarball with ``simple-examples/data/<name>`` for each file, plus ``extra`` (name, bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in [(f"simple-examples/data/{n}", b) for n, b in files.items()] + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def server():
    """A local HTTP server; ``server.serve(path, bytes)`` returns the URL of that content."""
    content = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = content.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    class S:
        def serve(self, path, body):
            content[path] = body
            return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

    try:
        yield S()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/simple-examples.tgz"


def leftovers(root: Path):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def test_constants(shared_ptb):
    assert PTB_URL == "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
    listed = dict(reversed(line.split()) for line in (shared_ptb / "SHA256SUMS").read_text().splitlines() if line)
    assert PTB_SHA256 == {n: listed[n] for n in NAMES}


def test_download_real_files(server, ptb_root, tmp_path):
    files = {n: (ptb_root / n).read_bytes() for n in NAMES}
    decoys = [("simple-examples/data/ptb.char.train.txt", b"x"), ("../escape.txt", b"x"), ("/tmp/abs_lm_test", b"x")]
    url = server.serve("/simple-examples.tgz", make_tgz(files, decoys))
    root = tmp_path / "deep" / "ptb"
    assert prepare_ptb(str(root), url=url) == root
    assert leftovers(root) == sorted(NAMES)
    assert not (tmp_path / "deep" / "escape.txt").exists()
    for n in NAMES:
        assert hashlib.sha256((root / n).read_bytes()).hexdigest() == PTB_SHA256[n]


def test_download_synthetic_with_override(server, tmp_path):
    url = server.serve("/x.tgz", make_tgz(SYNTH))
    root = prepare_ptb(tmp_path / "d", url=url, expected_sha256=sums_of(SYNTH))
    assert {n: (root / n).read_bytes() for n in NAMES} == SYNTH
    assert leftovers(root) == sorted(NAMES)
    # Present files are not fetched again: a dead URL is fine now.
    assert prepare_ptb(tmp_path / "d", url=closed_port_url()) == root


def test_download_only_missing_files(server, tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    mine = b" my own valid file \n"
    (root / "ptb.valid.txt").write_bytes(mine)
    url = server.serve("/x.tgz", make_tgz(SYNTH))
    prepare_ptb(root, url=url, expected_sha256=sums_of(SYNTH))
    assert (root / "ptb.valid.txt").read_bytes() == mine
    assert (root / "ptb.train.txt").read_bytes() == SYNTH["ptb.train.txt"]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    bad = dict(SYNTH, **{"ptb.valid.txt": b" tampered \n"})
    url = server.serve("/x.tgz", make_tgz(bad))
    root = tmp_path / "d"
    with pytest.raises(DataError) as e:
        prepare_ptb(root, url=url, expected_sha256=sums_of(SYNTH))
    msg = one_line(e)
    assert "ptb.valid.txt" in msg and sums_of(SYNTH)["ptb.valid.txt"][:12] in msg
    assert sums_of(bad)["ptb.valid.txt"][:12] in msg and "LM_DATA_ROOT" in msg
    assert leftovers(root) == []  # not even the good files or the temporary archive


def test_real_sums_reject_synthetic(server, tmp_path):
    url = server.serve("/x.tgz", make_tgz(SYNTH))
    with pytest.raises(DataError, match="checksum mismatch for ptb.train.txt"):
        prepare_ptb(tmp_path / "d", url=url)
    assert leftovers(tmp_path / "d") == []


def test_unreachable_url(tmp_path):
    root = tmp_path / "d"
    with pytest.raises(DataError) as e:
        prepare_ptb(root, url=closed_port_url(), timeout=5)
    msg = one_line(e)
    assert "LM_DATA_ROOT" in msg and str(root) in msg
    assert leftovers(root) == []


def test_http_error(server, tmp_path):
    url = server.serve("/other", b"")
    with pytest.raises(DataError, match=r"HTTP 404.*LM_DATA_ROOT") as e:
        prepare_ptb(tmp_path / "d", url=url.replace("/other", "/nope.tgz"))
    one_line(e)


def test_not_a_tarball(server, tmp_path):
    url = server.serve("/x.tgz", b"<html>this is a captive portal</html>" * 10)
    with pytest.raises(DataError, match=r"not a valid \.tgz.*LM_DATA_ROOT") as e:
        prepare_ptb(tmp_path / "d", url=url)
    one_line(e)
    assert leftovers(tmp_path / "d") == []


def test_truncated_tarball(server, tmp_path):
    whole = make_tgz({n: bytes(range(256)) * 400 for n in NAMES})
    url = server.serve("/x.tgz", whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"not a valid \.tgz") as e:
        prepare_ptb(tmp_path / "d", url=url)
    one_line(e)
    assert leftovers(tmp_path / "d") == []


def test_tarball_without_members(server, tmp_path):
    files = {"ptb.train.txt": SYNTH["ptb.train.txt"]}
    url = server.serve("/x.tgz", make_tgz(files, [("ptb.valid.txt", b"wrong place"), ("data/ptb.test.txt", b"x")]))
    with pytest.raises(DataError) as e:
        prepare_ptb(tmp_path / "d", url=url, expected_sha256=sums_of(SYNTH))
    msg = one_line(e)
    assert "simple-examples/data/ptb.valid.txt" in msg and "simple-examples/data/ptb.test.txt" in msg
    assert leftovers(tmp_path / "d") == []


def test_member_that_is_not_a_file(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("simple-examples/data/ptb.train.txt")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    url = server.serve("/x.tgz", buf.getvalue())
    with pytest.raises(DataError, match="not as a regular file"):
        prepare_ptb(tmp_path / "d", url=url, expected_sha256=sums_of(SYNTH))


def test_missing_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        prepare_ptb(tmp_path / "nowhere", download=False)
    msg = one_line(e)
    assert str(tmp_path / "nowhere") in msg and "LM_DATA_ROOT" in msg and "ptb.train.txt" in msg
    assert isinstance(e.value, UserError)


def write_synth(root: Path, **override):
    root.mkdir(parents=True, exist_ok=True)
    for n, b in {**SYNTH, **override}.items():
        (root / n).write_bytes(b)
    return root


def test_existing_empty_file(tmp_path):
    root = write_synth(tmp_path / "d", **{"ptb.test.txt": b""})
    with pytest.raises(DataError, match="ptb.test.txt is empty") as e:
        prepare_ptb(root, download=False)
    one_line(e)
    write_synth(root, **{"ptb.test.txt": b" \n\n"})
    with pytest.raises(DataError, match="ptb.test.txt is empty"):
        read_split_text(root, "test")


def test_existing_non_utf8_file(tmp_path):
    root = write_synth(tmp_path / "d", **{"ptb.valid.txt": b" caf\xe9 \n"})
    with pytest.raises(DataError, match=r"ptb.valid.txt is not UTF-8.*0xe9") as e:
        prepare_ptb(root, download=False)
    one_line(e)


def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LM_DATA_ROOT", raising=False)
    assert resolve_root(None) == tmp_path / "data" / "ptb"
    monkeypatch.setenv("LM_DATA_ROOT", "env/ptb")
    assert resolve_root(None) == tmp_path / "env" / "ptb"
    assert resolve_root("explicit") == tmp_path / "explicit"
    assert resolve_root(tmp_path / "abs") == tmp_path / "abs"
    write_synth(tmp_path / "env" / "ptb")
    assert prepare_ptb(None, download=False) == tmp_path / "env" / "ptb"


def test_advice_follows_the_lookup_order_and_a_failed_fetch_leaves_no_folder(tmp_path, monkeypatch):
    """data.root > $LM_DATA_ROOT > data/ptb: the message names the setting in force, never one
    that it overrides; a download that fails removes the folders it created."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LM_DATA_ROOT", str(tmp_path / "env"))
    explicit = tmp_path / "missing" / "ptb"
    with pytest.raises(DataError) as e:
        prepare_ptb(explicit, url=closed_port_url(), timeout=5)  # data.root=/missing/ptb
    msg = one_line(e)
    assert f"in {explicit}, or set data.root (which takes precedence over $LM_DATA_ROOT)" in msg
    assert "set $LM_DATA_ROOT" not in msg
    assert not (tmp_path / "missing").exists()  # neither ptb/ nor its parent is left behind
    with pytest.raises(DataError) as e:  # data.root unset: $LM_DATA_ROOT chose the folder
        prepare_ptb(None, download=False)
    msg = one_line(e)
    assert f"in {tmp_path / 'env'}, or set $LM_DATA_ROOT (or data.root, which takes precedence)" in msg
    monkeypatch.delenv("LM_DATA_ROOT")
    with pytest.raises(DataError) as e:  # neither: the default folder
        prepare_ptb(None, url=closed_port_url(), timeout=5)
    msg = one_line(e)
    assert f"in {tmp_path / 'data' / 'ptb'}, or set data.root or $LM_DATA_ROOT" in msg
    assert not (tmp_path / "data").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(DataError):  # a folder that was there before stays
        prepare_ptb(kept, url=closed_port_url(), timeout=5)
    assert kept.is_dir()
