"""prep without local files: downloads from mirrors over real HTTP, and a clear way out when offline."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import idxdata
import pytest
from stepsupport import datasets_entries, disk_events, partial_leftovers, step_env

from mlsteps import datasets, prep
from mlsteps.core import StepError

CLOSED_PORT = "http://127.0.0.1:9/"  # discard port: nothing listens, the connection is refused at once
UNVERIFIED = Path("cache/fashion_mnist/unverified")  # under the data root: downloads made with checksums off


@pytest.fixture
def no_system_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide OS-installed copies (Debian's dataset-fashion-mnist) so that prep has to download."""
    for name, spec in datasets.KNOWN.items():
        monkeypatch.setitem(datasets.KNOWN, name, dataclasses.replace(spec, system_dirs=()))


def _cache_files(data_root: Path) -> list[str]:
    cache = data_root / "cache"
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_offline_without_source_dir_fails_fast_with_a_way_out(data_root, prepare, no_system_copies,
                                                              monkeypatch) -> None:
    opened = []
    real_urlopen = prep.urllib.request.urlopen
    monkeypatch.setattr(prep.urllib.request, "urlopen", lambda url, **kw: opened.append(url) or real_urlopen(url, **kw))
    with pytest.raises(prep.DatasetUnavailableError) as caught:
        prepare(None, dataset="mnist", mirrors=(CLOSED_PORT,))
    assert opened == [CLOSED_PORT + "train-images-idx3-ubyte.gz"]  # a refused connection is not retried
    message = str(caught.value)
    assert "--source-dir" in message
    assert "fashion_mnist" in message
    assert "127.0.0.1:9/train-images-idx3-ubyte.gz" in message
    assert _cache_files(data_root) == []
    assert datasets_entries(data_root) == []
    assert partial_leftovers(data_root) == []


@pytest.mark.skipif(any(Path(d).is_dir() for d in datasets.MNIST.system_dirs),
                    reason="MNIST is installed on this machine, so prep would not need the network")
def test_offline_cli_exits_2_with_one_line_error_and_no_traceback(tmp_path, data_root) -> None:
    result_path = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "mlsteps.prep", "--data-root", str(data_root), "--dataset", "mnist",
         "--mirrors", CLOSED_PORT, "--result-path", str(result_path)],
        capture_output=True, text=True, env=step_env(), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "--source-dir" in done.stderr
    assert not result_path.exists()
    assert _cache_files(data_root) == []


def test_invalid_bool_flag_is_an_argparse_error(data_root) -> None:
    done = subprocess.run([sys.executable, "-m", "mlsteps.prep", "--data-root", str(data_root),
                           "--verify-checksums", "maybe"], capture_output=True, text=True, env=step_env(),
                          timeout=60)
    assert done.returncode == 2
    assert "--verify-checksums" in done.stderr and "expected true/false" in done.stderr
    assert "Traceback" not in done.stderr


def _serve_dataset(folder: Path, **kwargs) -> None:
    idxdata.write_dataset(folder, **kwargs)


def test_download_lands_files_in_cache_and_prepares_manifest(data_root, prepare, http_mirror,
                                                              no_system_copies) -> None:
    url, folder, requested = http_mirror
    _serve_dataset(folder)
    result = prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url,))

    # Not checked against the known digests: cached apart, never under the official name.
    assert _cache_files(data_root) == sorted(f"fashion_mnist/unverified/{name}" for name in idxdata.NAMES.values())
    for name in idxdata.NAMES.values():
        assert (data_root / UNVERIFIED / name).read_bytes() == (folder / name).read_bytes()
        # Readable by others, as a plain download is (the temporary file it was is created owner-only).
        assert (data_root / UNVERIFIED / name).stat().st_mode & 0o777 == 0o644
    manifest_path = Path(result["manifest"])
    assert manifest_path.is_file()
    assert manifest_path.parent.parent == data_root / "datasets" / "fashion_mnist"
    sources = json.loads(manifest_path.read_text())["sources"]
    assert sources["train_images"]["path"] == str(data_root / UNVERIFIED / idxdata.NAMES["train_images"])
    assert sorted(requested) == sorted(f"/{name}" for name in idxdata.NAMES.values())
    assert partial_leftovers(data_root) == []


def test_a_download_is_on_the_disk_before_it_takes_its_name_in_the_cache(data_root, prepare, http_mirror,
                                                                        no_system_copies, monkeypatch) -> None:
    """A node that loses power right after would otherwise keep an empty file under the cached name, and
    prep would then fail its checksum (or parse) on every later run instead of downloading it again."""
    url, folder, _ = http_mirror
    _serve_dataset(folder)
    events = disk_events(monkeypatch)
    prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url,))

    cache = data_root / UNVERIFIED
    for name in idxdata.NAMES.values():
        publish = events.index(("replace", str(cache / name)))
        assert any(event == "fsync" and Path(path).parent == cache and Path(path).name.startswith(f".{name}.")
                   and path.endswith(".download") for event, path in events[:publish]), name


def test_two_preps_downloading_the_same_file_at_once_both_get_it(data_root, no_system_copies) -> None:
    """make demo beside a DAG run on one data root, or a retried pod while the old one still runs: each
    download writes its own temporary file (one shared name: one truncated the other's, or took it away)."""
    name = idxdata.NAMES["train_labels"]
    body = idxdata.idx_bytes((4000,), bytes(i % 10 for i in range(4000)))
    both_asked = threading.Barrier(2, timeout=20)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:100])
            self.wfile.flush()
            both_asked.wait()  # each download has begun before either ends
            self.wfile.write(body[100:])

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    spec = datasets.KNOWN["fashion_mnist"]
    config = prep.PrepConfig(data_root=str(data_root), dataset="fashion_mnist", verify_checksums=False,
                             mirrors=(f"http://127.0.0.1:{server.server_address[1]}/",))
    outcomes: list[object] = []

    def obtain() -> None:
        try:
            outcomes.append(prep._obtain(spec, config, spec.file("train_labels")))
        except Exception as exc:  # noqa: BLE001 (the outcome under test)
            outcomes.append(exc)

    try:
        threads = [threading.Thread(target=obtain) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    cached = data_root / UNVERIFIED / name
    assert outcomes == [cached, cached]
    assert cached.read_bytes() == body
    assert partial_leftovers(data_root) == []


def test_cached_download_is_reused_without_network(data_root, prepare, http_mirror, no_system_copies) -> None:
    url, folder, requested = http_mirror
    _serve_dataset(folder)
    first = prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url,))
    requested.clear()
    again = prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(CLOSED_PORT,))
    assert requested == []
    assert again["cached"] is True
    assert again["manifest"] == first["manifest"]


def test_mirror_answering_404_falls_through_to_next_mirror(data_root, prepare, http_mirror, no_system_copies) -> None:
    url, folder, requested = http_mirror
    _serve_dataset(folder / "good")
    result = prepare(None, dataset="fashion_mnist", verify_checksums=False,
                     mirrors=(url + "missing/", url + "good/"))
    assert Path(result["manifest"]).is_file()
    assert [p for p in requested if p.startswith("/missing/")] == [f"/missing/{n}" for n in idxdata.NAMES.values()]
    assert len(_cache_files(data_root)) == 4
    assert partial_leftovers(data_root) == []


def test_all_mirrors_404_reports_every_url(data_root, prepare, http_mirror, no_system_copies) -> None:
    url, _, _ = http_mirror
    with pytest.raises(prep.DatasetUnavailableError) as caught:
        prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url + "a/", url + "b/"))
    message = str(caught.value)
    assert f"{url}a/train-images-idx3-ubyte.gz" in message
    assert f"{url}b/train-images-idx3-ubyte.gz" in message
    assert message.lower().count("not found") >= 2
    assert _cache_files(data_root) == []


def test_mirror_with_wrong_checksums_is_rejected_and_nothing_is_cached(data_root, prepare, http_mirror,
                                                                        no_system_copies) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder)
    with pytest.raises(prep.DatasetUnavailableError, match="SHA-256"):
        prepare(None, dataset="fashion_mnist", mirrors=(url,))
    assert _cache_files(data_root) == []
    assert datasets_entries(data_root) == []


def test_truncated_download_falls_through_to_next_mirror_and_leaves_no_partial(data_root, prepare, http_mirror,
                                                                                no_system_copies) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder / "good")
    broken = folder / "broken"
    _serve_dataset(broken)
    for name in idxdata.NAMES.values():
        # What a connection dropped mid-transfer leaves: a gzip stream without its end.
        (broken / name).write_bytes((broken / name).read_bytes()[:-30])
    result = prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url + "broken/", url + "good/"))
    assert Path(result["manifest"]).is_file()
    assert partial_leftovers(data_root) == []


def test_truncated_download_from_only_mirror_is_reported_and_not_kept(data_root, prepare, http_mirror,
                                                                      no_system_copies) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder)
    name = idxdata.NAMES["train_images"]
    (folder / name).write_bytes((folder / name).read_bytes()[:-30])
    with pytest.raises(prep.DatasetUnavailableError, match="gzip stream is corrupt") as caught:
        prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url,))
    assert f"{url}{name}: served a damaged file: gzip stream is corrupt or truncated" in str(caught.value)
    # Not the advice for a cached file ("delete it"), nor the name of a temporary file already removed.
    assert "delete it" not in str(caught.value) and ".download" not in str(caught.value)
    assert _cache_files(data_root) == []
    assert partial_leftovers(data_root) == []
    assert datasets_entries(data_root) == []


def test_gzip_served_files_decompress_to_the_served_content(data_root, prepare, http_mirror, no_system_copies) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder, train=50, test=20)
    result = prepare(None, dataset="mnist", verify_checksums=False, mirrors=(url,))
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["splits"]["test"]["count"] == 20
    payload = gzip.decompress((folder / idxdata.NAMES["test_labels"]).read_bytes())
    assert manifest["splits"]["test"]["class_histogram"] == [payload[8:].count(bytes([c])) for c in range(10)]


def test_a_download_that_matches_the_known_checksums_is_verified_and_cached(data_root, prepare, http_mirror,
                                                                            monkeypatch, no_system_copies) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder)
    # The served files stand in for the official ones: their digests become the known ones.
    spec = datasets.KNOWN["fashion_mnist"]
    files = tuple(dataclasses.replace(f, sha256=(hashlib.sha256((folder / f.name).read_bytes()).hexdigest(),),
                                      content_sha256=None) for f in spec.files)
    monkeypatch.setitem(datasets.KNOWN, "fashion_mnist", dataclasses.replace(spec, files=files))

    result = prepare(None, dataset="fashion_mnist", mirrors=(url,))  # checksums verified: the default
    sources = json.loads(Path(result["manifest"]).read_text())["sources"]
    assert {role: sources[f.role]["sha256"] for role, f in zip(idxdata.NAMES, files)} == {
        f.role: f.sha256[0] for f in files}
    assert _cache_files(data_root) == sorted(f"fashion_mnist/{name}" for name in idxdata.NAMES.values())


@pytest.mark.parametrize("verify", [True, False], ids=["checksums", "no-checksums"])
def test_a_mirror_serving_a_web_page_is_named_as_such_not_as_a_checksum_or_cache_problem(
        data_root, prepare, http_mirror, no_system_copies, verify) -> None:
    url, folder, _ = http_mirror
    for name in idxdata.NAMES.values():
        (folder / name).write_bytes(b"<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    with pytest.raises(prep.DatasetUnavailableError) as caught:
        prepare(None, dataset="mnist", verify_checksums=verify, mirrors=(url,))
    message = str(caught.value)
    assert f"{url}train-images-idx3-ubyte.gz: served something that is not an IDX file (it starts with " \
           "b'<!DOCTYPE html>" in message
    # Not "verify it or trust it with --verify-checksums false", nor "delete" a temporary file already gone.
    assert "SHA-256" not in message and "Delete it" not in message and ".download" not in message
    assert partial_leftovers(data_root) == [] and _cache_files(data_root) == []


def test_a_mirror_serving_another_file_is_named_without_its_temporary_file(data_root, prepare, http_mirror,
                                                                          no_system_copies) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder)  # valid IDX files, not the official ones
    with pytest.raises(prep.DatasetUnavailableError) as caught:
        prepare(None, dataset="fashion_mnist", mirrors=(url,))
    message = str(caught.value)
    assert f"{url}train-images-idx3-ubyte.gz: SHA-256 " in message
    assert "this mirror serves another file than the official train-images-idx3-ubyte.gz" in message
    assert "Delete it" not in message and ".download" not in message


@pytest.mark.parametrize("mirror", ["http://user:s3cret@mirror.example/mnist/",
                                    "https://user:s3cret@mirror.example:8443/"], ids=["no-port", "port"])
def test_a_mirror_url_with_credentials_is_refused_before_anything_is_fetched_and_never_written_out(
        data_root, prepare, no_system_copies, caplog, monkeypatch, mirror) -> None:
    """urllib sends no credentials from a URL: it took "s3cret@mirror.example" for the host (a DNS error) or
    the port ("nonnumeric port: 's3cret@...'", the password in the message)."""
    monkeypatch.setattr(prep.urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(StepError, match="holds a user name or password, which prep's downloads cannot send") as caught:
        prepare(None, dataset="mnist", mirrors=(mirror,))
    assert "s3cret" not in str(caught.value) + caplog.text and "user:***@mirror.example" in str(caught.value)


def test_a_download_ended_by_sigterm_leaves_no_temporary_file(data_root, prepare, http_mirror, no_system_copies,
                                                              monkeypatch) -> None:
    """A pod timed out or a task cleared mid-download (SystemExit from the SIGTERM handler): each try's file
    has a name of its own, so one left behind would stay for good."""
    url, folder, _ = http_mirror
    _serve_dataset(folder)

    def killed(url: str, dest: Path, timeout: float) -> None:
        dest.write_bytes(b"\x1f\x8b partial")
        raise SystemExit(143)

    monkeypatch.setattr(prep, "_download", killed)
    with pytest.raises(SystemExit):
        prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url,))
    assert partial_leftovers(data_root) == [] and _cache_files(data_root) == []


def test_a_mirror_serving_a_web_page_instead_of_the_files_falls_through_and_caches_none_of_it(
        data_root, prepare, http_mirror, no_system_copies) -> None:
    url, folder, _ = http_mirror
    (folder / "portal").mkdir()
    for name in idxdata.NAMES.values():  # a captive portal or error page answering 200 (unverifiable without checksums)
        (folder / "portal" / name).write_bytes(b"<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    _serve_dataset(folder / "good")

    result = prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url + "portal/", url + "good/"))
    assert Path(result["manifest"]).is_file()
    for name in idxdata.NAMES.values():
        assert (data_root / UNVERIFIED / name).read_bytes() == (folder / "good" / name).read_bytes()
    assert partial_leftovers(data_root) == []


@pytest.fixture
def dropping_mirror() -> Iterator[tuple[str, list[str]]]:
    """A server that starts sending the training labels and drops the connection; 404 for other files.

    Under /chunked/ the body is chunked, elsewhere it falls short of its Content-Length.
    """
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            requested.append(self.path)
            if not self.path.endswith(idxdata.NAMES["train_labels"]):
                self.send_error(404)
                return
            self.send_response(200)
            start = b"\x1f\x8b" + bytes(14)  # the first bytes of a gzip stream
            if self.path.startswith("/chunked/"):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(start), start))
            else:
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(start)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("transfer", ["chunked", "content-length"])
def test_a_connection_dropped_mid_download_is_retried_then_the_next_mirror_serves_the_file(
        data_root, prepare, http_mirror, dropping_mirror, no_system_copies, transfer) -> None:
    url, folder, _ = http_mirror
    _serve_dataset(folder)
    dropping, requested = dropping_mirror
    name = idxdata.NAMES["train_labels"]

    result = prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(f"{dropping}{transfer}/", url))
    assert Path(result["manifest"]).is_file()
    assert requested.count(f"/{transfer}/{name}") == 3  # a dropped connection is transient: tried 3 times
    assert (data_root / UNVERIFIED / name).read_bytes() == (folder / name).read_bytes()
    assert partial_leftovers(data_root) == []


def test_an_unchecked_download_is_cached_apart_and_a_checked_run_never_takes_it_for_the_official_file(
        data_root, prepare, http_mirror, no_system_copies) -> None:
    """Cached under the official name, a download made with --verify-checksums false failed every checked run
    on that data root ("does not match ... Delete it"), and fed every unchecked one as this dataset."""
    url, folder, _ = http_mirror
    _serve_dataset(folder)
    prepare(None, dataset="mnist", verify_checksums=False, mirrors=(url,))
    assert all(name.startswith("mnist/unverified/") for name in _cache_files(data_root))

    with pytest.raises(prep.DatasetUnavailableError) as caught:  # checked: downloads the official file
        prepare(None, dataset="mnist", mirrors=(CLOSED_PORT,))
    assert "127.0.0.1:9/train-images-idx3-ubyte.gz" in str(caught.value)
    assert "An unchecked copy is in" in str(caught.value) and "--verify-checksums false" in str(caught.value)
    again = prepare(None, dataset="mnist", verify_checksums=False, mirrors=(CLOSED_PORT,))  # unchecked: reused
    assert again["cached"] is True


def test_a_disk_that_cannot_take_the_download_is_named_and_no_other_mirror_is_tried(
        data_root, prepare, http_mirror, no_system_copies, monkeypatch) -> None:
    """Taken for the mirror's failure, a full disk fetched the file again from every mirror, then advised
    going offline (exit 2, nothing retried)."""
    import errno

    url, folder, requested = http_mirror
    _serve_dataset(folder / "a")
    _serve_dataset(folder / "b")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.os, "fsync", full)
    with pytest.raises(prep.CacheWriteError) as caught:
        prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url + "a/", url + "b/"))
    message = str(caught.value)
    assert "No space left on device" in message and str(data_root / UNVERIFIED) in message
    assert "offline" not in message
    assert requested == ["/a/" + idxdata.NAMES["train_images"]]
    assert partial_leftovers(data_root) == [] and _cache_files(data_root) == []


def test_a_data_root_that_is_a_file_is_named_with_the_fix_instead_of_a_traceback(tmp_path) -> None:
    data_root = tmp_path / "data"
    data_root.write_text("not a folder")
    source = idxdata.write_dataset(tmp_path / "source", train=40, test=10)
    for extra in (["--source-dir", str(source), "--dataset", "custom"], ["--dataset", "mnist", "--mirrors",
                                                                         CLOSED_PORT]):
        done = subprocess.run([sys.executable, "-m", "mlsteps.prep", "--data-root", str(data_root), *extra,
                               "--result-path", str(tmp_path / "result.json")],
                              capture_output=True, text=True, env=step_env(), timeout=120)
        assert done.returncode == 2, done.stderr  # the runners do not retry it
        assert "Traceback" not in done.stderr
        assert f"--data-root {data_root}" in done.stderr and "give a folder this step can write" in done.stderr


def test_a_mirror_that_times_out_is_skipped_for_the_other_files_and_a_missing_local_file_is_not_retried(
        data_root, prepare, http_mirror, no_system_copies, monkeypatch, tmp_path) -> None:
    """A mirror that never answers cost each of the four files three timed-out attempts; a file:// path that
    does not exist was tried three times."""
    import socket

    url, folder, _ = http_mirror
    _serve_dataset(folder)
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    stalled = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    missing = (tmp_path / "nowhere").as_uri() + "/"
    opened: list[str] = []
    real_urlopen = prep.urllib.request.urlopen
    monkeypatch.setattr(prep.urllib.request, "urlopen",
                        lambda target, **kw: opened.append(target) or real_urlopen(target, **kw))
    monkeypatch.setattr(prep._download.retry, "sleep", lambda seconds: None)
    try:
        result = prepare(None, dataset="fashion_mnist", verify_checksums=False, download_timeout=0.3,
                         mirrors=(missing, stalled, url))
    finally:
        silent.close()
    assert Path(result["manifest"]).is_file()
    assert [u for u in opened if u.startswith(stalled)] == [stalled + idxdata.NAMES["train_images"]] * 3
    assert [u for u in opened if u.startswith(missing)] == [missing + n for n in idxdata.NAMES.values()]


def test_a_mirror_with_a_query_string_is_refused_naming_what_a_mirror_is(data_root, prepare, no_system_copies,
                                                                       monkeypatch) -> None:
    """The file's name was appended to the query ("...?X-Amz-Signature=abc/train-images-idx3-ubyte.gz")."""
    monkeypatch.setattr(prep.urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(StepError, match="has a query or fragment") as caught:
        prepare(None, dataset="mnist", mirrors=("https://bucket.example/mnist/?X-Amz-Signature=abc",))
    assert "--source-dir" in str(caught.value)


def test_a_download_left_by_a_killed_prep_is_removed_once_abandoned(data_root, prepare, http_mirror,
                                                                    no_system_copies) -> None:
    import os
    import time

    from mlsteps.core import ABANDONED_AFTER_S

    url, folder, _ = http_mirror
    _serve_dataset(folder)
    cache = data_root / UNVERIFIED
    cache.mkdir(parents=True)
    old, young = cache / ".train-images-idx3-ubyte.gz.abc.download", cache / ".t10k-images-idx3-ubyte.gz.d.download"
    old.write_bytes(b"half")
    young.write_bytes(b"half")  # may be a live prep's
    os.utime(old, (time.time() - ABANDONED_AFTER_S - 60,) * 2)
    prepare(None, dataset="fashion_mnist", verify_checksums=False, mirrors=(url,))
    assert not old.exists() and young.exists()
