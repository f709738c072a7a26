"""Where dumps go, who can read them, and when they are deleted."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pytest
from _tasks import describe, fill, held_fds, live_dumps, relayout_in_place, slice_of

import mmexec._store as store_module
import mmexec._tempfolder as tempfolder_module
from mmexec import MemmapExecutor, TempFolderError


def test_files_are_private_and_unguessable(mx):
    """The folder is 0700 and each dump 0600, with a long random name, unlinked once written."""
    a = np.ones(100_000)
    mx.submit(describe, a).result()
    folder = mx._store.folder
    ((path, fd),) = held_fds(mx).items()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    namespace = re.escape(tempfolder_module.pid_namespace())
    assert namespace and re.fullmatch(rf"mmexec-{os.getpid()}-{namespace}-[0-9a-f]{{24}}", os.path.basename(folder))
    target = os.readlink(path)
    assert re.fullmatch(rf"{re.escape(folder)}/[0-9a-f]{{32}}\.mmap \(deleted\)", target)
    assert os.listdir(folder) == []


def test_default_folder_is_dev_shm(mx, monkeypatch):
    """Without temp_folder or MMEXEC_TEMP_FOLDER, dumps go to /dev/shm."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    assert os.path.dirname(mx._store.folder) == "/dev/shm"


def test_temp_folder_argument_wins_over_environment(tmp_path, monkeypatch):
    """temp_folder= comes first, then MMEXEC_TEMP_FOLDER."""
    (tmp_path / "env").mkdir()
    (tmp_path / "arg").mkdir()
    monkeypatch.setenv("MMEXEC_TEMP_FOLDER", str(tmp_path / "env"))
    with MemmapExecutor(1, temp_folder=tmp_path / "arg") as ex:
        assert os.path.dirname(ex._store.folder) == str(tmp_path / "arg")
    with MemmapExecutor(1) as ex:
        assert os.path.dirname(ex._store.folder) == str(tmp_path / "env")
        a = np.ones(300_000)
        ex.submit(describe, a).result()
        assert [p.startswith(str(tmp_path / "env")) for p in live_dumps(ex)] == [True]
    assert os.listdir(tmp_path / "env") == []


def test_user_folder_is_left_in_place(tmp_path):
    """A folder the user chose is theirs: only mmexec's own subfolder is deleted."""
    with MemmapExecutor(1, temp_folder=tmp_path) as ex:
        ex.submit(describe, np.ones(300_000)).result()
    assert tmp_path.is_dir() and os.listdir(tmp_path) == []


def test_full_shm_falls_back_to_system_temp(mx, monkeypatch):
    """When /dev/shm has no room and no folder was chosen, the dump goes to the system temp folder."""
    real = store_module.free_bytes
    monkeypatch.setattr(store_module, "free_bytes", lambda f: 0 if f.startswith("/dev/shm") else real(f))
    a = np.ones(123_457)  # a size no freed dump of an earlier test can serve
    assert mx.submit(describe, a).result()["type"] == "memmap"
    fallback = [f for f in mx._store._folders.values() if f.startswith(tempfile.gettempdir())]
    assert fallback and [p.startswith(fallback[0]) for p in live_dumps(mx)] == [True]


def _mounted_tmpfs(tmp_path, name: str, options: str) -> Iterator[str]:
    """A real tmpfs mounted at ``tmp_path/name`` (needs root and mount); skipped where that is not allowed."""
    mnt = tmp_path / name
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_tmpfs(tmp_path) -> Iterator[str]:
    """A real 1 MiB tmpfs."""
    yield from _mounted_tmpfs(tmp_path, "tiny", "size=1m")


def test_full_temp_folder_error_says_what_to_do(tiny_tmpfs):
    """A dump that does not fit fails its future with TempFolderError naming folder, sizes and the fix."""
    with MemmapExecutor(1, temp_folder=tiny_tmpfs) as ex:
        fut = ex.submit(describe, np.ones(2**18))
        with pytest.raises(TempFolderError) as info:
            fut.result()
        message = str(info.value)
        assert tiny_tmpfs in message and "2,097,152 bytes needed" in message
        assert "temp_folder" in message and "MMEXEC_TEMP_FOLDER" in message
        assert isinstance(info.value, OSError)
        assert os.listdir(ex._store.folder) == [] and live_dumps(ex) == []
        assert ex.submit(describe, np.ones(10)).result()["sum"] == 10.0


def test_disk_full_during_write_removes_partial_file(tiny_tmpfs, monkeypatch):
    """If the disk fills up while writing, the partial dump is removed and the error is clear."""
    monkeypatch.setattr(store_module, "free_bytes", lambda f: 2**40)
    with MemmapExecutor(1, temp_folder=tiny_tmpfs) as ex:
        with pytest.raises(TempFolderError, match="not enough space"):
            ex.submit(describe, np.ones(2**18)).result()
        assert os.listdir(ex._store.folder) == []
    assert os.listdir(tiny_tmpfs) == []


def test_unwritable_temp_folder_is_a_clear_error(tmp_path):
    """A temp folder that cannot exist (below a file) names itself and the way out, at construction."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TempFolderError, match="MMEXEC_TEMP_FOLDER"):
        MemmapExecutor(1, temp_folder=blocker / "sub")


def test_shutdown_deletes_files_of_live_arrays(tmp_path):
    """Dumps of arrays the caller still holds are released at shutdown."""
    a = np.ones(300_000)
    with MemmapExecutor(1, temp_folder=tmp_path) as ex:
        ex.submit(describe, a).result()
        folder = ex._store.folder
        assert len(live_dumps(ex)) == 1
    assert not os.path.exists(folder) and live_dumps(ex) == []


def test_results_stay_valid_after_shutdown():
    """A large result stays readable after its executor shut down (its file is already unlinked)."""
    with MemmapExecutor(1, max_nbytes="64K") as ex:
        r = ex.submit(np.full, 100_000, 4.0).result()
    assert r.sum() == 400_000.0


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_freed_dump_is_reused_for_the_next_array_with_the_right_data(mx):
    """A new array of the same size reuses a freed dump's pages, and tasks see the new values."""
    a = np.ones(100_000)
    mx.submit(describe, a).result()
    (first,) = held_fds(mx)
    del a
    gc.collect()
    b = np.full(100_000, 2.0)
    assert mx.submit(describe, b).result()["sum"] == 200_000.0
    assert list(held_fds(mx)) == [first]


def test_dump_still_mapped_by_a_result_is_never_reused(mx):
    """A result that views a dumped argument keeps that dump's data, even after the argument dies."""
    a = np.arange(100_000.0)
    r = mx.submit(slice_of, a, 0, 100_000).result()
    del a
    gc.collect()
    b = np.zeros(100_000)
    assert mx.submit(describe, b).result()["sum"] == 0.0
    np.testing.assert_array_equal(r[:3], [0.0, 1.0, 2.0])
    assert float(r.sum()) == float(np.arange(100_000.0).sum())


def test_unused_spare_dumps_are_freed_after_a_moment(mx):
    """A freed dump nobody reuses is closed by the background thread within seconds."""
    a = np.ones(100_000)
    mx.submit(describe, a).result()
    del a
    gc.collect()
    assert held_fds(mx) == {}
    assert _wait_for(lambda: not mx._store._spares._items), "spare dump still kept"


def test_memory_measure_counts_an_unlinked_dump_once():
    """tree_memory (demo, bench) counts a dump held only by a descriptor, and only once."""
    from mmexec._procmem import tree_memory

    with MemmapExecutor(2) as ex:
        ex.submit(describe, np.ones(10)).result(timeout=60)  # warm: the worker's own allocations happen now
        b = np.full(8 * 2**20, 2.0)  # 64 MiB
        before = tree_memory()
        assert ex.submit(describe, b).result(timeout=60)["sum"] == 2.0 * b.size  # dumped, unlinked, held
        grown = tree_memory() - before
    assert 0.9 * b.nbytes <= grown <= 1.3 * b.nbytes, grown / b.nbytes


@pytest.mark.parametrize("how", ["world-writable", "parent world-writable", "another user's", "via the variable"])
def test_a_temp_folder_other_users_can_change_is_refused_at_construction(tmp_path, monkeypatch, how):
    """A folder (or a folder above it) that another user can rename things in is refused with a clear error:
    otherwise they could swap mmexec's private folder for theirs, read dumps and replace results."""
    folder = tmp_path / "shared"
    folder.mkdir()
    target = folder
    if how == "world-writable":
        folder.chmod(0o777)
    elif how == "parent world-writable":
        folder.chmod(0o777)
        target = folder / "mine"
        target.mkdir(mode=0o700)
    elif how == "another user's":
        if os.getuid() != 0:
            pytest.skip("needs root to give a folder to another user")
        os.chown(folder, 65534, 65534)
    else:
        folder.chmod(0o777)
        monkeypatch.setenv("MMEXEC_TEMP_FOLDER", str(folder))
    with pytest.raises(TempFolderError, match="not safe for private data") as info:
        MemmapExecutor(1) if how == "via the variable" else MemmapExecutor(1, temp_folder=str(target))
    assert str(folder) in str(info.value)
    assert not [p for p in folder.rglob("*") if p.name.startswith("mmexec-")]


def test_a_sticky_shared_folder_is_accepted(tmp_path):
    """World-writable with the sticky bit (as /tmp and /dev/shm): others cannot rename our folder there."""
    folder = tmp_path / "sticky"
    folder.mkdir()
    folder.chmod(0o1777)
    with MemmapExecutor(1, temp_folder=str(folder)) as ex:
        assert ex.submit(describe, np.ones(2**18)).result()["type"] == "memmap"


@pytest.fixture
def tmpfs_64m(tmp_path) -> Iterator[str]:
    """A real 64 MiB tmpfs, private to this user."""
    yield from _mounted_tmpfs(tmp_path, "t64", "size=64m,mode=0700")


def test_two_threads_dumping_into_a_folder_with_room_for_one_do_not_both_fail(tmpfs_64m, monkeypatch):
    """Each dump reserves its whole size first: of two 40 MiB dumps racing into 64 MiB, one gets its room;
    the other fails (or, if the first was freed, succeeds) with an honest error, and nothing is left."""
    import threading

    monkeypatch.setattr(store_module, "free_bytes", lambda f: 2**40)  # both pass the free-space check at once

    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def dump_one(i: int) -> None:
        with MemmapExecutor(1, temp_folder=tmpfs_64m) as ex:
            a = np.full(40 * 2**20 // 8, float(i))
            barrier.wait()
            try:
                outcomes[i] = ex.submit(describe, a).result()["sum"]
            except TempFolderError as exc:
                outcomes[i] = exc

    for _ in range(3):
        threads = [threading.Thread(target=dump_one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        sums = [o for o in outcomes if isinstance(o, float)]
        errors = [o for o in outcomes if isinstance(o, TempFolderError)]
        assert len(sums) + len(errors) == 2 and sums, outcomes
        expected = [float(i) * 40 * 2**20 // 8 for i, o in enumerate(outcomes) if isinstance(o, float)]
        assert sorted(sums) == sorted(expected)
        for exc in errors:
            assert "41,943,040 bytes needed" in str(exc)
        assert os.listdir(tmpfs_64m) == []


def test_freed_files_kept_for_reuse_are_let_go_before_a_folder_is_called_full(tmpfs_64m):
    """A 40 MiB dump freed (kept for reuse) holds room; a 45 MiB array, too big to reuse it, still gets its
    room: kept files are freed before TempFolderError is raised (#19)."""
    with MemmapExecutor(1, temp_folder=tmpfs_64m) as ex:
        a = np.ones(40 * 2**20 // 8)
        assert ex.submit(describe, a).result()["sum"] == a.size
        del a
        gc.collect()
        b = np.full(45 * 2**20 // 8, 2.0)
        assert ex.submit(describe, b).result()["sum"] == 2.0 * b.size


def test_shutdown_frees_everything_in_a_chosen_folder_so_it_can_be_unmounted(tmpfs_64m):
    """After the with block nothing holds the folder's file system: freed files kept for reuse are closed too."""
    with MemmapExecutor(1, temp_folder=tmpfs_64m) as ex:
        a = np.ones(2**20)
        assert ex.submit(describe, a).result()["sum"] == 2**20
        r = ex.submit(np.full, 2**20, 2.0).result()  # a result file, freed below
        del a, r
        gc.collect()
    gc.collect()
    assert [s for s in store_module.SPARES._items if s.where == tmpfs_64m] == []
    assert subprocess.run(["umount", tmpfs_64m], capture_output=True).returncode == 0  # not busy
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", tmpfs_64m], check=True)


@pytest.mark.parametrize("how", ["a file", "below a file", "under /proc", "the variable, a file"])
def test_a_temp_folder_that_cannot_hold_files_is_refused_at_construction(tmp_path, monkeypatch, how):
    """A file, a folder below a file or a folder under /proc is a TempFolderError when the executor is created."""
    target: object = tmp_path / "f"
    (tmp_path / "f").write_text("")
    if how == "below a file":
        target = tmp_path / "f" / "sub"
    elif how == "under /proc":
        target = "/proc/self"
    if how.startswith("the variable"):
        monkeypatch.setenv("MMEXEC_TEMP_FOLDER", str(target))
        target = None
    with pytest.raises(TempFolderError, match="temp_folder|MMEXEC_TEMP_FOLDER") as info:
        MemmapExecutor(1, temp_folder=target)
    assert "/dev/shm" in str(info.value)


@pytest.mark.parametrize("via", ["argument", "variable"])
def test_a_missing_temp_folder_is_created_private_and_removed_at_shutdown(tmp_path, monkeypatch, via):
    """As joblib, a temp folder that does not exist is created (0700, with missing parents); mmexec removes
    what it created when the executor shuts down, and nothing else."""
    target = tmp_path / "new" / "deeper"
    if via == "variable":
        monkeypatch.setenv("MMEXEC_TEMP_FOLDER", str(target))
    with MemmapExecutor(1, temp_folder=str(target) if via == "argument" else None) as ex:
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
        assert ex.submit(describe, np.ones(2**18)).result()["type"] == "memmap"
    assert not (tmp_path / "new").exists() and tmp_path.exists()


def test_an_empty_temp_folder_means_unset_for_the_argument_and_the_variable(monkeypatch):
    """temp_folder='' and MMEXEC_TEMP_FOLDER='' both mean the default, never the current directory."""
    monkeypatch.setenv("MMEXEC_TEMP_FOLDER", "")
    for ex in (MemmapExecutor(1, temp_folder=""), MemmapExecutor(1)):
        with ex:
            assert ex._store._base == MemmapStoreBase()


def MemmapStoreBase() -> str:  # noqa: N802 - reads like the value it stands for
    return store_module.resolve_temp_folder(None)[0]


def test_mmap_mode_none_and_infinite_max_nbytes_turn_mapping_off():
    """As joblib, mmap_mode=None passes arrays by pickling; max_nbytes=float('inf') maps nothing."""
    a = np.ones(2**18)
    for options in ({"mmap_mode": None}, {"max_nbytes": float("inf")}):
        with MemmapExecutor(1, **options) as ex:
            assert ex.submit(describe, a).result()["type"] == "ndarray"
            assert live_dumps(ex) == []
    with pytest.raises(ValueError, match="mmap_mode must be one of"):
        MemmapExecutor(1, mmap_mode="x")


def test_loading_a_joblib_dump_says_what_to_use_instead(tmp_path):
    """mmexec.load of a joblib.dump file (a pickle) names joblib.load, instead of numpy's format error."""
    joblib = pytest.importorskip("joblib")
    from mmexec import load

    for compress in (0, 3, ("gzip", 3), ("bz2", 3), ("lzma", 3), ("xz", 3)):
        path = tmp_path / f"a{compress!s:.6}.joblib"
        joblib.dump(np.arange(10), path, compress=compress)
        with pytest.raises(ValueError, match="joblib.load"):
            load(path, mmap_mode="r")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_sweep_judges_only_folders_of_its_own_pid_namespace(tmp_path):
    """With /dev/shm shared across PID namespaces, a pid means nothing outside its own: a folder is removed only
    if it carries this namespace and its pid is dead here, and loky's semaphores only for such a dead caller."""
    namespace = tempfolder_module.pid_namespace()
    inode, boot = namespace.split(".")
    mine, other = _dead_pid(), _dead_pid()
    ours = tmp_path / f"mmexec-{mine}-{namespace}-{'a' * 24}"
    foreign = tmp_path / f"mmexec-{other}-{int(inode, 16) + 1:x}.{boot}-{'b' * 24}"  # another PID namespace
    elsewhere = tmp_path / f"mmexec-{other}-{inode}.{'0' * 12}-{'d' * 24}"  # another machine (shared folder)
    old_style = tmp_path / f"mmexec-{other}-{'c' * 24}"
    for folder in (ours, foreign, elsewhere, old_style):
        folder.mkdir(mode=0o700)
        (folder / "partial.mmap").write_bytes(b"x")
    sem_mine, sem_other = f"/dev/shm/sem.loky-{mine}-test", f"/dev/shm/sem.loky-{other}-test"
    for sem in (sem_mine, sem_other):
        with open(sem, "w"):
            pass
    try:
        MemmapExecutor(1, temp_folder=str(tmp_path)).shutdown()
        assert not ours.exists() and not os.path.exists(sem_mine)  # dead here: swept, with its semaphores
        assert foreign.exists() and elsewhere.exists() and old_style.exists()  # not provably dead
        assert os.path.exists(sem_other)
    finally:
        for sem in (sem_mine, sem_other):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sem)


def test_dumps_racing_into_a_nearly_full_default_folder_fall_back_to_the_temp_folder(tmpfs_64m, monkeypatch):
    """With no folder chosen, a dump that loses the race for the last room in /dev/shm (here a 64 MiB tmpfs
    standing in for it) goes to the system temp folder, as when the free-space check finds no room."""
    import threading

    import mmexec._options as options_module

    monkeypatch.setattr(options_module, "SHM_FOLDER", tmpfs_64m)
    monkeypatch.setattr(store_module, "free_bytes", lambda f: 2**40)  # both pass the check at once
    monkeypatch.delenv("MMEXEC_TEMP_FOLDER", raising=False)
    for _ in range(3):
        barrier = threading.Barrier(2)
        sums: list[object] = [None, None]

        def dump_one(i: int, barrier: threading.Barrier = barrier, sums: list[object] = sums) -> None:
            with MemmapExecutor(1) as ex:
                assert ex._store._base == tmpfs_64m and not ex._store._explicit
                a = np.full(40 * 2**20 // 8, float(i + 1))
                barrier.wait()
                try:
                    sums[i] = ex.submit(describe, a).result()["sum"]
                except TempFolderError as exc:
                    sums[i] = exc

        threads = [threading.Thread(target=dump_one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sums == [float(i + 1) * 40 * 2**20 // 8 for i in range(2)]
        assert os.listdir(tmpfs_64m) == []


def test_a_result_freed_after_shutdown_holds_nothing_in_a_chosen_folder(tmpfs_64m):
    """A large result that outlives its executor, freed after shutdown(), is closed at once, not kept for
    reuse: nothing holds the chosen folder's file system."""
    from mmexec._housekeeper import HOUSEKEEPER

    with MemmapExecutor(1, temp_folder=tmpfs_64m) as ex:
        r = ex.submit(np.full, 2**20, 2.0).result()
    assert float(r.sum()) == 2.0 * 2**20
    del r
    gc.collect()
    assert HOUSEKEEPER.flush(10)
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert [target for target in held if target.startswith(tmpfs_64m)] == []


def test_a_missing_folder_shared_by_two_executors_is_made_private_and_removed(tmp_path):
    """Two executors given the same missing folder: whichever needs it re-creates it (0700) if the other
    removed it, and nothing is left once both are shut down."""
    folder = tmp_path / "sub" / "tf"
    first, second = MemmapExecutor(1, temp_folder=str(folder)), MemmapExecutor(1, temp_folder=str(folder))
    first.shutdown()
    assert second.submit(describe, np.ones(2**18)).result()["type"] == "memmap"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    second.shutdown()
    assert not (tmp_path / "sub").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to a group")
def test_a_group_writable_folder_is_refused_only_if_others_are_in_the_group(tmp_path):
    """Group-writable is fine for a group of this user alone (user-private groups, umask 002); a group
    another user belongs to (here nobody's, 65534) is refused."""
    import grp

    try:
        grp.getgrgid(65534)
    except KeyError:
        pytest.skip("no group 65534 here")
    if not tempfolder_module._own_group(os.getgid()) or tempfolder_module._own_group(65534):
        pytest.skip("needs this user's group to be private and group 65534 to have another user")
    private = tmp_path / "private-group"
    private.mkdir(mode=0o775)
    os.chown(private, 0, os.getgid())
    private.chmod(0o775)
    MemmapExecutor(1, temp_folder=str(private)).shutdown()
    shared = tmp_path / "shared-group"
    shared.mkdir()
    os.chown(shared, 0, 65534)
    shared.chmod(0o770)
    with pytest.raises(TempFolderError, match="writable by other users"):
        MemmapExecutor(1, temp_folder=str(shared))


def test_two_threads_dumping_one_array_at_once_both_keep_a_file_held(monkeypatch, tmp_path):
    """The manager and the feeder may dump the same array at the same moment; the later dump replaces the
    earlier one. The task of the earlier one must still hold its file (it was once released between the
    dump and the task's hold, and the next dump of that size reused the file under the task)."""
    import threading

    from mmexec._store import Holds, MemmapStore, Session

    store = MemmapStore(1024, "r", str(tmp_path / "folder"))
    a = np.arange(1_000_000, dtype=np.float64)
    orig_new, orig_write = MemmapStore._new_dump, MemmapStore._write
    both_writing = threading.Barrier(2)
    first_made, second_done = threading.Event(), threading.Event()

    def write(self, arr, users=1):
        both_writing.wait(10)  # both looked the array up (no dump yet) and dump it
        if threading.current_thread().name == "second":
            first_made.wait(10)  # the second dump registers last, replacing the first
        return orig_write(self, arr, users)

    def new_dump(self, arr, *args, **kwargs):
        dump = orig_new(self, arr, *args, **kwargs)
        if threading.current_thread().name == "first":
            first_made.set()
            second_done.wait(10)  # the first thread pauses right after its dump was made
        else:
            second_done.set()
        return dump

    monkeypatch.setattr(MemmapStore, "_write", write)
    monkeypatch.setattr(MemmapStore, "_new_dump", new_dump)
    out = {}

    def encode(name: str) -> None:
        holds = Holds(Session())
        out[name] = (store._dump_ref(a, holds), holds)

    threads = [threading.Thread(target=encode, args=(name,), name=name) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.undo()
    first = out["first"][0].path
    assert first in store.held_paths(), "the first task's file was let go while the task still names it"
    b = np.full(1_000_000, 7.0)
    other = store._dump_ref(b, Holds(Session()))
    assert other.path != first
    mapped = np.memmap(first, dtype=np.float64, mode="r", shape=(1_000_000,))
    np.testing.assert_array_equal(mapped[:3], a[:3])
    del mapped
    for _, holds in out.values():
        holds.release()
    store.close()


def test_a_result_freed_during_interpreter_exit_under_a_spares_lock_does_not_deadlock(monkeypatch):
    """Once the interpreter exits, a finalizer may run where the thread holds the spares' lock: the release
    it posts must not run there (it once took that lock again, inline)."""
    import threading

    from mmexec._housekeeper import HOUSEKEEPER
    from mmexec._spares import SPARES

    with MemmapExecutor(1) as ex:
        r = ex.submit(np.ones, 1_000_000).result(timeout=60)
    assert isinstance(r, np.memmap) or r.base is not None

    class Cycle:
        pass

    c = Cycle()
    c.me, c.r = c, r
    del r, c  # freed only by the cycle collector
    monkeypatch.setattr(HOUSEKEEPER, "exiting", True)

    def collect_under_the_lock() -> None:
        with SPARES._lock:
            gc.collect()

    t = threading.Thread(target=collect_under_the_lock, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a finalizer deadlocked on the spares' lock"
    monkeypatch.undo()
    HOUSEKEEPER.run_pending()


@pytest.fixture
def count_writes(monkeypatch):
    """How many times the store writes an array into a file."""
    writes: list[int] = []
    real = store_module.write_array

    def counting(fd, path, a, *args, **kwargs):
        writes.append(a.nbytes)
        return real(fd, path, a, *args, **kwargs)

    monkeypatch.setattr(store_module, "write_array", counting)
    return writes


def test_a_fresh_executor_adopts_the_dump_an_unchanged_array_left_instead_of_writing_it_again(count_writes):
    a = np.arange(300_000.0)
    for _ in range(3):
        with MemmapExecutor(2) as ex:
            assert ex.submit(describe, a).result()["sum"] == float(a.sum())
    assert len(count_writes) == 1


def test_an_array_changed_or_relaid_between_executors_is_dumped_again(count_writes):
    a = np.zeros(300_000)
    with MemmapExecutor(2) as ex:
        assert ex.submit(describe, a).result()["sum"] == 0.0
    a[-1] = 5.0  # (the last page only)
    with MemmapExecutor(2) as ex:
        assert ex.submit(describe, a).result()["sum"] == 5.0
    relayout_in_place(a, shape=(1000, 300))  # the same bytes, another shape
    with MemmapExecutor(2) as ex:
        assert ex.submit(np.shape, a).result() == (1000, 300)
    assert len(count_writes) == 3


def test_a_dump_a_task_wrote_through_is_not_adopted_by_the_next_executor(count_writes):
    """With mmap_mode='r+' a task writes the dump, not the caller's array: the next executor must not take
    that dump for the array."""
    a = np.ones(300_000)
    with MemmapExecutor(2, mmap_mode="r+") as ex:
        ex.submit(fill, a, 7.0).result()
    with MemmapExecutor(2) as ex:
        assert ex.submit(describe, a).result()["sum"] == 300_000.0
    assert len(count_writes) == 2


def test_fresh_parallel_calls_dump_an_unchanged_array_once_but_not_in_a_chosen_folder(count_writes, tmp_path):
    from mmexec import Parallel, delayed

    a = np.arange(300_000.0)
    for _ in range(3):
        assert Parallel(n_jobs=2)(delayed(float)(a[i]) for i in range(4)) == [0.0, 1.0, 2.0, 3.0]
        assert Parallel(n_jobs=2)(delayed(describe)(a) for _ in range(2))[1]["sum"] == float(a.sum())
    assert len(count_writes) == 1
    for _ in range(2):  # a chosen folder may be unmounted after shutdown: nothing is kept there
        Parallel(n_jobs=2, temp_folder=str(tmp_path))(delayed(describe)(a) for _ in range(2))
        assert os.listdir(tmp_path) == []
    assert len(count_writes) == 3


@pytest.mark.parametrize("mode", ["r+", "w+"])
def test_with_a_writable_mmap_mode_a_task_never_writes_a_result_the_caller_holds(mode):
    """A large result is a map of a file mmexec holds: passed back to a task, it travels by reference, and with
    mmap_mode='r+' or 'w+' tasks write what they get. They write private pages, as ProcessPoolExecutor's copy."""
    with MemmapExecutor(2, mmap_mode=mode) as ex:
        r = ex.submit(np.ones, 300_000).result()
        ex.submit(fill, r, 7.0).result()
        assert float(r.sum()) == 300_000.0
        a = np.ones(300_000)
        ex.submit(fill, a, 7.0).result()  # (an array of the caller's: its dump is written, never the array)
        assert float(a.sum()) == 300_000.0
