"""`mimo pull` against a real HTTP server on 127.0.0.1 speaking the hub's endpoints."""

import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_server import HubServer
from mimo_local.cli import app
from mimo_local.store.names import MANIFEST, is_complete, parse_name

REPO = "XiaomiMiMo/MiMo-7B-RL"
SHARD = "model-00001-of-00002.safetensors"


def mimo(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private store, no token, no offline mode, no stored hub login."""
    monkeypatch.setenv("MIMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def hub(isolated, monkeypatch, checkpoints):
    server = HubServer()
    server.add_repo(REPO, checkpoints("mimo"))
    server.add_repo("acme/tiny-moe", checkpoints("mimo_v2_flash", fp8=True), revisions=("main", "v1"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def store_dir() -> Path:
    return parse_name("mimo-7b-rl").path


def assert_same_files(pulled: Path, source: Path):
    expected = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*")
                if p.is_file() and ".mimo-runtime" not in p.parts}  # a local load's cache, not the repo's
    got = {str(p.relative_to(pulled)): p.read_bytes() for p in pulled.rglob("*") if p.is_file() and ".mimo" not in p.parts}
    assert got == expected


def test_full_pull_verifies_every_file_and_marks_complete(hub, checkpoints):
    result = mimo("pull", "mimo-7b-rl")
    assert result.exit_code == 0, result.output
    assert_same_files(store_dir(), checkpoints("mimo"))
    manifest = json.loads((store_dir() / MANIFEST).read_text())
    assert manifest["repo_id"] == REPO and manifest["commit"] == hub.repos[REPO].commit
    assert set(manifest["files"]) == set(hub.repos[REPO].files)
    assert manifest["files"][SHARD]["sha256"] and manifest["files"]["config.json"]["git_sha1"]
    assert dict(hub.served) == {name: len(data) for name, data in hub.repos[REPO].files.items()}
    assert "pulled mimo-7b-rl" in result.stderr
    assert not (store_dir() / ".mimo" / "partial").exists()
    # files are fetched at the resolved commit, LFS files through the CDN redirect
    resolves = [path for method, path, _ in hub.requests if "/resolve/" in path]
    assert resolves and all(f"/resolve/{hub.repos[REPO].commit}/" in path for path in resolves)
    assert any(path.startswith("/cdn/") and path.endswith(SHARD) for _, path, _ in hub.requests)


def test_second_pull_fetches_nothing(hub):
    assert mimo("pull", "mimo-7b-rl").exit_code == 0
    served = sum(hub.served.values())
    result = mimo("pull", REPO)
    assert result.exit_code == 0, result.output
    assert sum(hub.served.values()) == served


def test_interrupted_pull_resumes_inside_the_file(hub):
    size = len(hub.repos[REPO].files[SHARD])
    hub.cut[SHARD] = size // 2
    first = mimo("pull", "mimo-7b-rl", "--retries", "0")
    line = one_error_line(first)
    assert SHARD in line and "run `mimo pull mimo-7b-rl` again to resume" in line
    part = store_dir() / ".mimo" / "partial" / (SHARD + ".part")
    assert part.stat().st_size == size // 2
    assert not is_complete(store_dir())

    second = mimo("pull", "mimo-7b-rl")
    assert second.exit_code == 0, second.output
    assert hub.served[SHARD] == size  # the first half was not fetched again
    ranges = [headers.get("Range") for _, path, headers in hub.requests if path.endswith(SHARD) and "/cdn/" in path]
    assert ranges == [None, f"bytes={size // 2}-"]
    assert (store_dir() / SHARD).read_bytes() == hub.repos[REPO].files[SHARD]
    assert is_complete(store_dir())


def test_dropped_connection_is_retried_from_where_it_stopped(hub):
    size = len(hub.repos[REPO].files[SHARD])
    hub.cut[SHARD] = size // 3
    result = mimo("pull", "mimo-7b-rl")
    assert result.exit_code == 0, result.output
    assert hub.served[SHARD] == size
    assert (store_dir() / SHARD).read_bytes() == hub.repos[REPO].files[SHARD]


@pytest.mark.parametrize("name", [SHARD, "config.json"])
def test_corrupted_byte_is_detected_and_refetched(hub, name):
    hub.corrupt.add(name)
    result = mimo("pull", "mimo-7b-rl")
    assert result.exit_code == 0, result.output
    data = hub.repos[REPO].files[name]
    assert (store_dir() / name).read_bytes() == data
    assert hub.served[name] == 2 * len(data)


def test_corrupt_partial_file_is_detected_and_refetched(hub):
    data = hub.repos[REPO].files[SHARD]
    part = store_dir() / ".mimo" / "partial" / (SHARD + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(b ^ 1 for b in data[:100]))
    result = mimo("pull", "mimo-7b-rl")
    assert result.exit_code == 0, result.output
    assert (store_dir() / SHARD).read_bytes() == data
    assert hub.served[SHARD] == len(data) - 100 + len(data)


def test_server_errors_on_a_file_are_retried(hub):
    hub.fail[SHARD] = [500, 503]
    result = mimo("pull", "mimo-7b-rl")
    assert result.exit_code == 0, result.output
    assert is_complete(store_dir())


def test_persistent_server_error_gives_up_with_a_clear_line(hub):
    hub.fail[SHARD] = [500] * 10
    line = one_error_line(mimo("pull", "mimo-7b-rl", "--retries", "1"))
    assert "server answered 500" in line and "gave up after 2 attempts" in line and "again to resume" in line
    assert not is_complete(store_dir())


def test_unknown_repo_is_404(hub):
    line = one_error_line(mimo("pull", "acme/nothing-here"))
    assert line == f"error: acme/nothing-here not found on {hub.url} (404): check the name"


def test_unknown_revision(hub):
    line = one_error_line(mimo("pull", "acme/tiny-moe@v9"))
    assert "revision 'v9' not found in acme/tiny-moe" in line


def test_metadata_500_is_a_clear_error(hub):
    hub.fail["api"] = [500]
    line = one_error_line(mimo("pull", "mimo-7b-rl"))
    assert line == f"error: {hub.url} answered 500 for {REPO}: the hub is having trouble, try again later"


def test_private_repo_needs_hf_token(hub, monkeypatch, checkpoints):
    hub.token = "hf_secret"
    line = one_error_line(mimo("pull", "mimo-7b-rl"))
    assert "(401)" in line and "set HF_TOKEN" in line

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert "rejected the token (401): check HF_TOKEN" in one_error_line(mimo("pull", "mimo-7b-rl"))

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    result = mimo("pull", "mimo-7b-rl")
    assert result.exit_code == 0, result.output
    assert_same_files(store_dir(), checkpoints("mimo"))
    hub_auth = {h.get("Authorization") for _, path, h in hub.requests if "/resolve/" in path}
    cdn_auth = {h.get("Authorization") for _, path, h in hub.requests if path.startswith("/cdn/")}
    assert hub_auth == {"Bearer hf_secret"} and cdn_auth == {None}  # the token never leaves the hub's host


def test_offline_mode_says_what_is_missing(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_error_line(mimo("pull", "mimo-7b-rl"))
    assert line == (
        f"error: mimo-7b-rl ({REPO}) is not in the local store and the hub cannot be reached (HF_HUB_OFFLINE is set): "
        "run `mimo pull mimo-7b-rl` when online, or pass a model directory"
    )
    assert not hub.requests


def test_unreachable_hub_says_what_is_missing(isolated, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = one_error_line(mimo("pull", "mimo-v2-flash"))
    assert line.startswith("error: mimo-v2-flash (XiaomiMiMo/MiMo-V2-Flash) is not in the local store and the hub "
                           f"cannot be reached (cannot reach http://127.0.0.1:{port}")
    assert line.endswith("run `mimo pull mimo-v2-flash` when online, or pass a model directory")


def test_not_enough_disk_space_is_checked_first(hub, monkeypatch):
    import mimo_local.store.pull

    monkeypatch.setattr(mimo_local.store.pull.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    line = one_error_line(mimo("pull", "mimo-7b-rl"))
    assert "not enough disk space to pull mimo-7b-rl" in line and "1.0 KB free" in line
    assert not hub.served


def test_include_and_exclude(hub):
    result = mimo("pull", "acme/tiny-moe@v1", "--include", "*.json", "--exclude", "tokenizer*")
    assert result.exit_code == 0, result.output
    directory = parse_name("acme/tiny-moe@v1").path
    assert directory.name == "acme--tiny-moe@v1"
    pulled = sorted(p.name for p in directory.iterdir() if p.is_file())
    assert pulled == sorted(n for n in hub.repos["acme/tiny-moe"].files if n.endswith(".json") and not n.startswith("tokenizer"))
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["include"] == ["*.json"] and manifest["exclude"] == ["tokenizer*"]
    assert "no files of acme/tiny-moe match" in one_error_line(mimo("pull", "acme/tiny-moe", "--include", "*.gguf"))
