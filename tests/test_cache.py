"""The stage cache: manifests, fingerprints, atomic writes, write failures, locks."""

import os

import pytest

from captioner import cache
from captioner.config import Config
from captioner.errors import CaptionerError


def _stage(tmp_path, params=None):
    source = tmp_path / "in.txt"
    output = tmp_path / "out.txt"
    return cache.Stage("demo", cache.manifest_path_for(output), {"source": source}, params or {"k": 1}, [output])


def test_stage_is_stale_until_finished_then_up_to_date(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    stage = _stage(tmp_path)
    assert stage.stale_reason() == "no finished run recorded"
    cache.atomic_write_text(tmp_path / "out.txt", "result")
    manifest = stage.finish(Config())
    assert manifest["config"]["train"]["epochs"] == Config().train.epochs  # the resolved config is saved
    assert _stage(tmp_path).up_to_date()


def test_stage_reruns_on_changed_input_params_or_output(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    cache.atomic_write_text(tmp_path / "out.txt", "result")
    _stage(tmp_path).finish()
    assert "parameters changed: k" in _stage(tmp_path, {"k": 2}).stale_reason()
    (tmp_path / "in.txt").write_text("hello!")
    assert "inputs changed: source" in _stage(tmp_path).stale_reason()
    _stage(tmp_path).finish()
    (tmp_path / "out.txt").unlink()
    assert "output missing" in _stage(tmp_path).stale_reason()


def test_folder_fingerprint_sees_added_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    before = cache.fingerprint(folder)
    (folder / "b.jpg").write_bytes(b"y")
    after = cache.fingerprint(folder)
    assert before["files"] == 1 and after["files"] == 2 and before["digest"] != after["digest"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    cache.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with cache.atomic_write(target) as handle:
            handle.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary left behind


# ----------------------------------------------------------------- write failures, locks


def test_a_failed_write_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path, file_size_limit):
    target = tmp_path / "out.bin"
    cache.atomic_write_bytes(target, b"old")
    with file_size_limit(1000), pytest.raises(cache.WriteError) as caught:
        cache.atomic_write_bytes(target, b"x" * 5000)
    message = str(caught.value)
    assert str(target) in message and "File too large" in message and "\n" not in message
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left behind


def test_a_full_disk_is_reported_and_the_old_file_kept(tmp_path, disk_full):
    target = tmp_path / "out.json"
    cache.atomic_write_json(target, {"v": 1})
    disk_full(target)
    with pytest.raises(cache.WriteError, match="No space left on device"):
        cache.atomic_write_json(target, {"v": 2})
    assert cache.json.loads(target.read_text()) == {"v": 1}


def test_permission_denied_is_a_write_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.os, "replace", refuse)
    with pytest.raises(cache.WriteError, match="cannot write .*out.txt: Permission denied"):
        cache.atomic_write_text(tmp_path / "out.txt", "x")


def test_write_together_replaces_all_or_none(tmp_path, file_size_limit):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cache.write_together({a: b"old a", b: b"old b"})
    with file_size_limit(100), pytest.raises(cache.WriteError, match="b.json"):
        cache.write_together({a: b"new a", b: b"n" * 500})
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")  # a was not replaced alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    cache.write_together({a: b"new a", b: b"new b"})
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")


def test_a_second_run_on_one_output_refuses_in_one_line(tmp_path):
    output = tmp_path / "model"
    with cache.output_lock(output):
        with pytest.raises(CaptionerError, match="being written by another run") as caught:
            with cache.output_lock(output):
                pass
        assert "\n" not in str(caught.value)
    with cache.output_lock(output):  # released: the next run may go
        pass


def test_a_refusal_inside_a_new_folders_lock_leaves_no_folder_behind(tmp_path):
    fresh, existing, written = tmp_path / "new" / "model", tmp_path / "old", tmp_path / "written"
    existing.mkdir()
    for output in (fresh, existing, written):
        with pytest.raises(CaptionerError, match="refused"):
            with cache.output_lock(output):
                if output is written:
                    (output / "part.json").write_text("{}")
                raise CaptionerError("refused")
    assert not (tmp_path / "new").exists()  # the folders the lock made go
    assert list(existing.iterdir()) == []  # a folder that was there stays as it was, without a lock file
    assert sorted(p.name for p in written.iterdir()) == ["part.json"]  # never what a run wrote
    with cache.output_lock(fresh):  # and the output can be taken again
        assert [p.name for p in fresh.iterdir()] == [".lock"]
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves nothing


def test_a_run_leaves_no_lock_file_behind_refused_or_not(tmp_path):
    output = tmp_path / "features.pkl"
    with cache.output_lock(output):
        assert cache.lock_path_for(output).exists()
        with pytest.raises(CaptionerError, match="being written by another run"):
            with cache.output_lock(output):
                pass
        assert cache.lock_path_for(output).exists()  # the refused run leaves the holder's lock alone
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CaptionerError, match="refused"):
        with cache.output_lock(output):
            raise CaptionerError("refused")
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_removed_by_its_holder_is_never_held_by_two_runs(tmp_path, monkeypatch):
    """The race that makes removing a lock file unsafe: a run opens the file, the holder then
    removes it and lets go, and the run locks a file nobody else can see while a third run
    locks the new one. The lock checks that the path still names the file it locked."""
    output = tmp_path / "out.pkl"
    path = cache.lock_path_for(output)
    real_flock = cache.fcntl.flock
    holder = []

    def flock_after_the_holder_left(fd, operation):
        if not holder:  # the first try: the holder removes and releases its file in between
            holder.append(True)
            path.unlink()
            third = os.open(path, os.O_RDWR | os.O_CREAT)  # a third run takes the path's new file
            real_flock(third, cache.fcntl.LOCK_EX | cache.fcntl.LOCK_NB)
            holder.append(third)
        return real_flock(fd, operation)

    monkeypatch.setattr(cache.fcntl, "flock", flock_after_the_holder_left)
    with pytest.raises(CaptionerError, match="being written by another run"):
        with cache.output_lock(output):
            pass
    os.close(holder[1])


def test_a_killed_runs_lock_file_is_taken_over(tmp_path):
    output = tmp_path / "out.pkl"
    cache.lock_path_for(output).write_text("")  # what a killed run leaves
    with cache.output_lock(output):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_lock_holds_across_processes(tmp_path):
    import subprocess
    import sys

    output = tmp_path / "features.pkl"
    script = (
        "import sys; from captioner import cache\n"
        "from captioner.errors import CaptionerError\n"
        "try:\n"
        f"    with cache.output_lock({str(output)!r}): print('got it')\n"
        "except CaptionerError as e: print(e)\n"
    )
    with cache.output_lock(output):
        busy = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "being written by another run" in busy.stdout and free.stdout.strip() == "got it"


def test_a_broken_symlink_added_to_an_input_folder_makes_the_stage_stale(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    before = cache.fingerprint(folder)
    (folder / "b.jpg").symlink_to(tmp_path / "missing.jpg")
    after = cache.fingerprint(folder)
    assert after != before and after["files"] == 2


# ----------------------------------------------------------------- what a stage may write over


def test_claim_output_lets_a_stage_write_only_over_its_own_files(tmp_path):
    output = tmp_path / "features.pkl"
    cache.claim_output(output, "features")  # nothing there: free
    output.write_bytes(b"the user's own pickle")
    with pytest.raises(CaptionerError) as caught:
        cache.claim_output(output, "features")
    assert str(caught.value) == (
        f"{output} exists and there is no manifest of captioner extract beside it (features.pkl.manifest.json): "
        "choose another --output, or --force replaces it"
    )
    cache.claim_output(output, "features", force=True)  # --force replaces it

    stage = cache.Stage("merge-features", cache.manifest_path_for(output), {}, {}, [output])
    stage.finish()
    with pytest.raises(CaptionerError, match="captioner merge-features wrote it, not captioner extract"):
        cache.claim_output(output, "features")
    cache.claim_output(output, "merge-features")  # its own

    marked = tmp_path / "other.pkl"
    marked.write_bytes(b"x")
    (tmp_path / "mark").write_text("")
    cache.claim_output(marked, "features", marks=[tmp_path / "mark"])  # a mark of the stage's own


def test_claim_output_checks_every_file_the_stage_writes(tmp_path):
    report, page = tmp_path / "eval-dev.json", tmp_path / "eval-dev.html"
    page.write_text("<p>the user's page</p>")
    with pytest.raises(CaptionerError, match=f"^{page} exists"):
        cache.claim_output(report, "evaluate", also=[page])
    page.unlink()
    (tmp_path / "eval-dev.parts").mkdir()  # an empty folder is nothing to lose
    cache.claim_output(report, "evaluate", also=[tmp_path / "eval-dev.parts"])


def test_claim_output_never_writes_into_a_folder_or_through_a_dangling_link(tmp_path):
    folder = tmp_path / "out.pkl"
    folder.mkdir()
    with pytest.raises(CaptionerError, match="is a folder; it must name a file"):
        cache.claim_output(folder, "features", force=True)
    link = tmp_path / "link.pkl"
    link.symlink_to(tmp_path / "nowhere" / "x.pkl")
    with pytest.raises(CaptionerError, match=r"link\.pkl is a symbolic link to .*nowhere/x\.pkl, which does not exist"):
        cache.claim_output(link, "features", force=True)
    with pytest.raises(CaptionerError, match="which does not exist"):
        with cache.output_lock(link):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pkl", "out.pkl"]


def test_claim_output_can_ask_each_file_itself(tmp_path):
    strip = tmp_path / "a.png"
    strip.write_bytes(b"a user's picture")
    with pytest.raises(CaptionerError, match="it is not a file caption --explain wrote"):
        cache.claim_output(strip, "explain", ours=lambda path: False, option="--explain folder")
    cache.claim_output(strip, "explain", ours=lambda path: True)


def test_claim_folder_lets_a_stage_write_only_into_a_folder_of_its_own(tmp_path):
    folder = tmp_path / "captions"
    cache.claim_folder(folder, "captions")  # missing: free
    folder.mkdir()
    (folder / ".lock").write_text("")
    cache.claim_folder(folder, "captions")  # nothing but a lock: free
    for name in ("train.json", "tokenizer.json", "notes.txt", "zz.txt"):
        (folder / name).write_text("the user's")
    with pytest.raises(CaptionerError) as caught:
        cache.claim_folder(folder, "captions", what="prepared captions")
    assert str(caught.value) == (
        f"{folder} is not empty and holds no prepared captions (notes.txt, tokenizer.json, train.json, ...): "
        "choose another --output, or --force writes into it"
    )
    cache.claim_folder(folder, "captions", force=True)
    cache.claim_folder(folder, "captions", own=["notes.txt", "tokenizer.json", "train.json", "zz.txt"])

    cache.atomic_write_json(folder / "manifest.json", {"version": 1, "stage": "demo-data"})
    with pytest.raises(CaptionerError, match="holds the output of captioner demo-data, not of captioner prepare"):
        cache.claim_folder(folder, "captions")
    cache.atomic_write_json(folder / "manifest.json", {"version": 1, "stage": "captions"})
    cache.claim_folder(folder, "captions")  # its own, whatever else the user keeps there

    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(CaptionerError, match="is a file; it must name a folder"):
        cache.claim_folder(afile, "captions", force=True)


def test_a_run_being_written_is_marked_as_the_stages_and_as_unfinished(tmp_path):
    output = tmp_path / "out.txt"
    stage = cache.Stage("demo", cache.manifest_path_for(output), {}, {"k": 1}, [output])
    with pytest.raises(RuntimeError):
        with stage.writing():
            raise RuntimeError("failed before writing anything")
    assert list(tmp_path.iterdir()) == []  # the mark went with it

    with pytest.raises(KeyboardInterrupt):
        with stage.writing():
            output.write_text("half")
            raise KeyboardInterrupt
    assert cache.manifest_stage(output) == "demo"  # a killed run's output is still the stage's
    assert cache.read_manifest(output) is None and stage.previous() is None  # but no finished run
    assert stage.stale_reason() == "no finished run recorded"
    cache.claim_output(output, "demo")

    with stage.writing():
        output.write_text("whole")
    stage.finish()
    assert stage.stale_reason() is None
    with stage.writing():  # a finished manifest stays until the next finish
        assert stage.previous() is not None
    with stage.writing(restart=True):
        assert stage.previous() is None


def test_a_folder_fingerprint_takes_a_file_name_that_is_not_utf8(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "plain.jpg").write_bytes(b"x")
    before = cache.fingerprint(folder)
    with open(os.fsencode(folder) + b"/caf\xe9.jpg", "wb") as handle:
        handle.write(b"y")
    after = cache.fingerprint(folder)
    assert after["files"] == 2 and after["digest"] != before["digest"]
