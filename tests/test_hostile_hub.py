"""`mimo pull` against a hostile hub on 127.0.0.1: bad file lists, bodies and answers.

Every attack must end in one error line on stderr and exit code 1 (or, where the answer can be
worked around, in a correct pull), with nothing written outside the model directory, no
traceback, and within a few seconds (timeouts are set small through the flags or environment).
"""

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import mimo_local.store.download
import mimo_local.store.pull
from hub_server import HubServer
from mimo_local.store.names import MANIFEST, parse_name
from mimo_local.store.repo_paths import conflicting_names, unsafe_reason
from test_hub import isolated, mimo  # noqa: F401  (fixtures)

REPO = "acme/small"
WEIGHTS = "model.safetensors"  # served as an LFS file, through the CDN redirect
WEIGHTS_SIZE = 300_000
FAST = ("--read-timeout", "1", "--retries", "0")


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "mimo"}\n')
    (source / WEIGHTS).write_bytes(random.Random(0).randbytes(WEIGHTS_SIZE))
    (source / "notes.txt").write_text("top\n")
    (source / "docs").mkdir()
    (source / "docs" / "notes.txt").write_text("nested\n")
    return source


@pytest.fixture
def hub(isolated, monkeypatch, files):  # noqa: F811
    server = HubServer()
    server.add_repo(REPO, files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


@pytest.fixture
def victim(isolated):  # noqa: F811
    """Files outside the store an attacker would like to write; their contents must not change."""
    folder = isolated / "victim"
    folder.mkdir()
    (folder / ".bashrc").write_text("echo safe\n")
    return folder


def model_dir() -> Path:
    return parse_name(REPO).path


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def refused(result, *fragments: str) -> str:
    """The one error line of a failed command, checked for the usual shape and `fragments`."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def pull(*args):
    started = time.monotonic()
    result = mimo("pull", REPO, *args)
    result.seconds = time.monotonic() - started
    return result


def weights_part() -> Path:
    return model_dir() / ".mimo" / "partial" / (WEIGHTS + ".part")


# --- hostile file lists ---------------------------------------------------------------------

HOSTILE_NAMES = [
    ("{tmp}/abs-evil.txt", "an absolute path"),
    ("../../../victim/.bashrc", "a '..' component"),
    ("../../config.json", "a '..' component"),  # the store's own settings
    ("docs/../../../../victim/.bashrc", "a '..' component"),
    ("%2e%2e/%2e%2e/%2e%2e/victim/.bashrc", "once decoded"),
    ("%252e%252e/%252e%252e/x", "once decoded"),
    ("..%2f..%2f..%2fvictim%2f.bashrc", "once decoded"),
    ("\uff0e\uff0e/\uff0e\uff0e/\uff0e\uff0e/victim/.bashrc", "once decoded"),  # fullwidth dots
    ("docs\\..\\..\\..\\victim\\.bashrc", "a backslash"),
    ("C:/Users/victim/.bashrc", "a drive letter"),
    ("C:evil", "a drive letter"),
    ("evil\n.txt", "control"),
    ("evil\x00.txt", "control"),
    ("\x1b[2Jevil.txt", "control"),
    ("\u202etxt.exe", "control or invisible"),
    ("docs//evil.txt", "empty path component"),
    ("docs/", "empty path component"),
    ("./config.json", "a '.' component"),
    ("...", "only dots"),
    (".mimo/manifest.json", "reserved"),
    (".MIMO/lock", "reserved"),
    ("", "empty"),
]


@pytest.mark.parametrize("name,reason", HOSTILE_NAMES)
def test_hostile_file_name_refuses_the_whole_pull(hub, victim, isolated, name, reason):  # noqa: F811
    name = name.format(tmp=isolated)
    hub.repos[REPO].files[name] = b"echo pwned\n"
    before = files_under(isolated)
    line = refused(pull(), f"refusing to pull {REPO}", repr(name)[:40], reason, "nothing was written")
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line
    assert files_under(isolated) == before  # nothing written anywhere: no model dir, no partial files
    assert not (isolated / "home").exists()
    assert not any("/resolve/" in path or "/cdn/" in path for _, path, _ in hub.requests)


def test_hostile_name_is_refused_even_when_include_would_skip_it(hub, isolated, victim):  # noqa: F811
    hub.repos[REPO].files["../../../victim/.bashrc"] = b"echo pwned\n"
    refused(pull("--include", "config.json"), "'../../../victim/.bashrc'")
    assert not (isolated / "home").exists()


@pytest.mark.parametrize("extra", ["config.json/x", "config.json.part/x"])
def test_a_file_that_is_also_a_folder_is_refused(hub, isolated, extra):  # noqa: F811
    hub.repos[REPO].files[extra] = b"{}"
    refused(pull(), f"names both 'config.json' and '{extra}'", "cannot be stored side by side")
    assert not (isolated / "home").exists()


@pytest.mark.parametrize(
    "override,what",
    [
        ({"size": -5}, "invalid size"),
        ({"size": "300"}, "invalid size"),
        ({"size": True}, "invalid size"),
        ({"lfs": {"size": 1, "sha256": "../../x", "pointerSize": 1}}, "invalid size or sha256"),
        ({"blobId": "not-a-sha1"}, "invalid size or git hash"),
        ({"rfilename": 7}, "not a string"),
    ],
)
def test_malformed_file_entries_are_refused(hub, isolated, override, what):  # noqa: F811
    target = WEIGHTS if "lfs" in override else "config.json"
    hub.repos[REPO].overrides[target] = override
    refused(pull(), what)
    assert not (isolated / "home").exists()


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b'"a string"', b"{not json", b'{"id": "acme/small", "siblings": [{"size": 3}]}',
     b'{"id": "acme/small", "sha": "../../x", "siblings": []}', b'{"id": "acme/small", "siblings": {"a": 1}}'],
)
def test_malformed_model_info_is_one_line(hub, isolated, body):  # noqa: F811
    hub.raw_info[REPO] = body
    refused(pull(), "malformed metadata")
    assert not (isolated / "home").exists()


# --- symbolic links in the store --------------------------------------------------------------


def test_a_link_to_outside_inside_the_model_directory_is_never_followed(hub, victim):
    hub.repos[REPO].files["docs/evil.txt"] = b"echo pwned\n"
    model_dir().mkdir(parents=True)
    (model_dir() / "docs").symlink_to(victim, target_is_directory=True)
    refused(pull(), "leads outside", "refusing to write")
    assert sorted(p.name for p in victim.iterdir()) == [".bashrc"]


def test_a_linked_state_directory_is_refused(hub, victim):
    model_dir().mkdir(parents=True)
    (model_dir() / ".mimo").symlink_to(victim, target_is_directory=True)
    refused(pull(), "leads outside")
    assert sorted(p.name for p in victim.iterdir()) == [".bashrc"]


def test_links_at_the_file_and_partial_paths_are_replaced_not_written_through(hub, victim, files):
    model_dir().mkdir(parents=True)
    (model_dir() / "config.json").symlink_to(victim / ".bashrc")
    weights_part().parent.mkdir(parents=True)
    weights_part().symlink_to(victim / ".bashrc")
    result = pull()
    assert result.exit_code == 0, result.output
    assert (victim / ".bashrc").read_text() == "echo safe\n"
    assert not (model_dir() / "config.json").is_symlink()
    assert (model_dir() / WEIGHTS).read_bytes() == (files / WEIGHTS).read_bytes()


# --- --include / --exclude ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,pulled",
    [
        (("--include", "*.txt"), {"notes.txt"}),  # a pattern without '/' does not reach into folders
        (("--include", "docs/*"), {"docs/notes.txt"}),
        (("--include", "docs/"), {"docs/notes.txt"}),
        (("--include", "*/notes.txt"), {"docs/notes.txt"}),
        (("--exclude", "*.txt"), {"config.json", WEIGHTS, "docs/notes.txt"}),
    ],
)
def test_globs_do_not_match_across_folders_unless_they_name_one(hub, args, pulled):
    result = pull(*args)
    assert result.exit_code == 0, result.output
    assert set(json.loads((model_dir() / MANIFEST).read_text())["files"]) == pulled


# --- hostile bodies and answers -------------------------------------------------------------


def test_a_longer_body_is_refused_and_the_part_dropped(hub):
    hub.oversize[WEIGHTS] = 10_000
    refused(pull(*FAST), WEIGHTS, f"server announced {WEIGHTS_SIZE + 10_000} bytes", "dropped the partial file")
    assert not weights_part().exists() and not (model_dir() / WEIGHTS).exists()


def test_an_endless_body_is_read_only_to_the_expected_size(hub):
    hub.endless.add(WEIGHTS)
    result = pull(*FAST)
    refused(result, WEIGHTS, f"server sent more than the {WEIGHTS_SIZE} bytes", "dropped the partial file")
    assert not weights_part().exists()
    assert result.seconds < 10  # read up to the file size, not to the end of the body


def test_an_oversized_partial_file_is_dropped_before_anything_is_written(hub, files, monkeypatch):
    """A disk filled by an old oversized part: the rerun frees it before writing source.json."""
    weights_part().parent.mkdir(parents=True)
    weights_part().write_bytes(b"z" * (WEIGHTS_SIZE * 3))
    real_write = mimo_local.store.pull.write_json_atomic

    def write_on_full_disk(path, data):
        if weights_part().exists() and weights_part().stat().st_size > WEIGHTS_SIZE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(mimo_local.store.pull, "write_json_atomic", write_on_full_disk)
    result = pull(*FAST)
    assert result.exit_code == 0, result.output
    assert (model_dir() / WEIGHTS).read_bytes() == (files / WEIGHTS).read_bytes()


def half_a_part(files: Path) -> int:
    weights_part().parent.mkdir(parents=True)
    weights_part().write_bytes((files / WEIGHTS).read_bytes()[: WEIGHTS_SIZE // 2])
    return WEIGHTS_SIZE // 2


def cdn_ranges(hub) -> list:
    cdn = [(path, headers) for _, path, headers in hub.requests if path.startswith("/cdn/")]
    return [headers.get("Range") for path, headers in cdn if path.endswith(WEIGHTS)]


@pytest.mark.parametrize(
    "answer",
    [(416, f"bytes */{WEIGHTS_SIZE}"), (416, None), (206, None), (206, "bytes 0-9/10"),
     (206, f"bytes 0-{WEIGHTS_SIZE - 1}/*")],
)
def test_an_unusable_answer_to_a_range_request_drops_the_part_and_starts_over_once(hub, files, answer):
    done = half_a_part(files)
    hub.range_answer[WEIGHTS] = answer
    result = pull(*FAST)
    assert result.exit_code == 0, result.output
    assert cdn_ranges(hub) == [f"bytes={done}-", None]
    assert (model_dir() / WEIGHTS).read_bytes() == (files / WEIGHTS).read_bytes()


def test_a_whole_file_for_a_range_request_restarts_from_the_beginning(hub, files):
    done = half_a_part(files)
    hub.range_answer[WEIGHTS] = (200, None)
    result = pull(*FAST)
    assert result.exit_code == 0, result.output
    assert cdn_ranges(hub) == [f"bytes={done}-"]
    assert (model_dir() / WEIGHTS).read_bytes() == (files / WEIGHTS).read_bytes()


def test_a_server_that_never_answers_usably_gives_up_after_one_fresh_start(hub, files):
    half_a_part(files)
    hub.answer[WEIGHTS] = (206, "bytes 5-9/10")
    refused(pull("--read-timeout", "1"), "server answered 206 with Content-Range 'bytes 5-9/10'",
            "even for the whole file", "dropped the partial file")
    assert len(cdn_ranges(hub)) == 2 and not weights_part().exists()


def test_a_server_reason_phrase_cannot_write_terminal_escapes(hub):
    hub.answer[WEIGHTS] = (418, None)
    hub.reason = "\x1b]0;pwned\x07\x1b[2J teapot"
    line = refused(pull(*FAST), "server answered 418 ?]0;pwned??[2J teapot")
    assert "\x1b" not in line and "\x07" not in line


def test_a_stall_ends_in_a_resumable_error(hub, files):
    hub.stall[WEIGHTS] = 50_000
    result = pull(*FAST)
    refused(result, WEIGHTS, "no data for 1 s at byte 50000 (read timeout)", f"run `mimo pull {REPO}` again to resume")
    assert result.seconds < 10  # a 1 s read timeout; without it this takes minutes
    assert weights_part().stat().st_size == 50_000  # kept for the resume

    again = pull(*FAST)
    assert again.exit_code == 0, again.output
    assert cdn_ranges(hub)[-1] == "bytes=50000-"
    assert (model_dir() / WEIGHTS).read_bytes() == (files / WEIGHTS).read_bytes()


def test_a_stall_is_retried_within_a_bounded_time(hub):
    hub.stall[WEIGHTS] = 1000
    result = pull("--read-timeout", "1", "--retries", "1")
    assert result.exit_code == 0, result.output  # the second attempt resumed at byte 1000
    assert result.seconds < 12
    assert cdn_ranges(hub) == [None, "bytes=1000-"]


def test_a_trickle_is_abandoned_below_the_speed_floor(hub, monkeypatch):
    monkeypatch.setenv("MIMO_PULL_READ_TIMEOUT", "1")
    monkeypatch.setenv("MIMO_PULL_MIN_SPEED", "1000")
    hub.trickle[WEIGHTS] = 0.1  # 10 bytes a second, never silent for a whole second
    result = pull("--retries", "0")
    refused(result, WEIGHTS, "transfer too slow", "below the floor of 1000 B/s", "again to resume")
    assert result.seconds < 10  # a 1 s read timeout; without it this takes minutes


def test_no_speed_floor_when_it_is_zero(hub, monkeypatch):
    hub.repos[REPO].files[WEIGHTS] = b"w" * 30
    hub.trickle[WEIGHTS] = 0.02
    result = pull("--read-timeout", "0.3", "--min-speed", "0", "--retries", "0")
    assert result.exit_code == 0, result.output
    assert (model_dir() / WEIGHTS).read_bytes() == b"w" * 30


@pytest.mark.parametrize("args,message", [(("--read-timeout", "0"), "--read-timeout must be"),
                                          (("--min-speed", "-1"), "--min-speed must be"),
                                          (("--read-timeout", "nan"), "--read-timeout must be")])
def test_bad_limits_are_one_line_errors(hub, args, message):
    refused(pull(*args), message)


def test_bad_limit_in_the_environment_is_one_line(hub, monkeypatch):
    monkeypatch.setenv("MIMO_PULL_MIN_SPEED", "fast")
    refused(pull(), "$MIMO_PULL_MIN_SPEED must be a number")


def test_disk_full_mid_file_says_how_much_is_needed_and_resumes(hub, files, monkeypatch):
    real_write = mimo_local.store.download._write_all
    written = []

    def fill_up(fd, data):
        if sum(written) >= 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        real_write(fd, data)

    monkeypatch.setattr(mimo_local.store.download, "_write_all", fill_up)
    line = refused(pull(*FAST), "disk full in", "more needed to finish acme/small",
                   f"run `mimo pull {REPO}` again to resume")
    kept = weights_part().stat().st_size
    listed_before = (files / "config.json").stat().st_size + (files / "docs" / "notes.txt").stat().st_size
    assert kept == sum(written) - listed_before and kept >= 100_000 - listed_before
    missing = WEIGHTS_SIZE - kept + len("top\n")  # the rest of the weights and notes.txt, listed after them
    assert f"{mimo_local.store.pull.format_bytes(missing)} more needed" in line

    monkeypatch.setattr(mimo_local.store.download, "_write_all", real_write)
    again = pull(*FAST)
    assert again.exit_code == 0, again.output
    assert cdn_ranges(hub)[-1] == f"bytes={kept}-"
    assert (model_dir() / WEIGHTS).read_bytes() == (files / WEIGHTS).read_bytes()


def test_disk_full_while_writing_housekeeping_files_is_one_line(hub, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mimo_local.store.pull, "write_json_atomic", full)
    refused(pull(*FAST), "disk full in", "free some space, then run `mimo pull acme/small` again to resume")


# --- mimo rm and a running pull -------------------------------------------------------------


def test_rm_refuses_while_a_pull_holds_the_lock(hub, isolated):  # noqa: F811
    hub.stall[WEIGHTS] = 1000
    env = {**os.environ, "MIMO_PULL_READ_TIMEOUT": "30"}
    process = subprocess.Popen([sys.executable, "-m", "mimo_local.cli", "pull", REPO, "--retries", "0"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while hub.served[WEIGHTS] < 1000 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert hub.served[WEIGHTS] == 1000, process.stderr.read() if process.poll() is not None else "no bytes served"
        line = refused(mimo("rm", REPO, "--yes"), f"{REPO} is being pulled right now")
        assert "let `mimo pull` finish" in line
        assert model_dir().is_dir()
    finally:
        process.kill()
        process.wait()
    removed = mimo("rm", REPO, "--yes")
    assert removed.exit_code == 0, removed.output
    assert not model_dir().exists()


# --- the name check on its own (hypothesis) -------------------------------------------------

DANGEROUS = st.sampled_from(list("./\\:%2eEfFcC \x00\n\x1b\u202e\uff0e\uff0f") + ["..", "%2e", "%2f", "%25", "C:"])


def _inside(root: str, name: str) -> bool:
    from urllib.parse import unquote

    import unicodedata

    decoded = [name, unquote(name), unquote(unquote(name))]
    for form in decoded + [unicodedata.normalize("NFKC", form) for form in decoded]:
        joined = os.path.normpath(os.path.join(root, form.replace("\\", "/")))
        if not joined.startswith(root + os.sep):
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.lists(DANGEROUS, max_size=12).map("".join))
def test_every_accepted_name_stays_inside_the_model_directory(name):
    if unsafe_reason(name) is None:
        assert _inside("/store/model", name), name
        assert name == os.path.normpath(name) and not name.startswith("/")
        assert all(c.isprintable() for c in name) and "\\" not in name


SAFE_COMPONENT = st.text(
    st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."), min_size=1, max_size=20
).filter(lambda c: c.strip(". ") != "")


@settings(max_examples=200, deadline=None)
@given(st.lists(SAFE_COMPONENT, min_size=1, max_size=4), st.integers(0, 4),
       st.sampled_from(["..", "/", "%2e%2e", "C:", "\\", "\x7f", "", "."]))
def test_a_hostile_component_anywhere_is_refused(parts, where, hostile):
    name = "/".join(parts)
    assert unsafe_reason(name) is None, name
    spoiled = parts[:where] + [hostile + ("x" if hostile in ("C:", "\\", "\x7f") else "")] + parts[where:]
    if hostile == "/":
        spoiled = ["/" + "/".join(parts)]
    assert unsafe_reason("/".join(spoiled)) is not None, spoiled


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(SAFE_COMPONENT, min_size=1, max_size=3).map("/".join), max_size=6))
def test_conflicting_names_finds_a_file_that_is_also_a_folder(names):
    clash = conflicting_names(names)
    folders = {"/".join(n.split("/")[:i]) for n in names for i in range(1, len(n.split("/")))}
    expected = len(set(names)) < len(names) or bool(folders & set(names))
    assert (clash is not None) == expected


# --- hostile metadata answers ---------------------------------------------------------------


def test_an_endless_file_list_is_cut_off(hub, isolated):  # noqa: F811
    hub.endless.add("api")
    result = pull(*FAST)
    refused(result, "sent more than 67.1 MB of metadata for acme/small: refused")
    assert result.seconds < 15
    assert not (isolated / "home").exists()


def test_a_trickled_file_list_is_abandoned(hub, isolated):  # noqa: F811
    hub.trickle["api"] = 0.1
    result = pull("--read-timeout", "1", "--min-speed", "1000")
    refused(result, "sent the metadata of acme/small too slowly", "below the floor of 1000 B/s")
    assert result.seconds < 10  # a 1 s read timeout; without it this takes minutes


def test_a_stalled_file_list_times_out(hub, isolated):  # noqa: F811
    hub.stall["api"] = 10
    result = pull("--read-timeout", "1")
    refused(result, "cannot be reached")
    assert result.seconds < 10  # a 1 s read timeout; without it this takes minutes


@pytest.mark.parametrize("key,message", [("api", "sent more than 67.1 MB of metadata"),
                                         (WEIGHTS, f"server sent more than the {WEIGHTS_SIZE} bytes")])
def test_endless_answers_stay_within_a_memory_bound(hub, key, message):
    """A real `mimo pull` process under a 400 MiB address-space limit (the fake hub sends up to 256 MiB)."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))

    hub.endless.add(key)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mimo_local.cli", "pull", REPO, *FAST], capture_output=True,
                            text=True, timeout=60, preexec_fn=limit_memory)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert time.monotonic() - started < 20


def test_a_file_name_that_looks_like_markup_is_shown_as_is_on_a_terminal(hub, files):
    """The progress bars (drawn only on a terminal) print file names as text, never as rich markup."""
    import pty
    import select

    name = "notes[/b]y.txt"  # a folder "notes[" and, as markup, a closing tag that matches nothing
    hub.repos[REPO].files[name] = b"odd\n"
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "mimo_local.cli", "pull", REPO, *FAST],
                               stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    screen, deadline = b"", time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        if select.select([leader], [], [], 0.1)[0]:
            try:
                screen += os.read(leader, 65536)
            except OSError:
                break
    process.wait(timeout=30)
    os.close(leader)
    assert process.returncode == 0, screen.decode(errors="replace")
    assert (model_dir() / name).read_bytes() == b"odd\n"
    assert b"Traceback" not in screen and b"pulled acme/small" in screen
