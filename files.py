"""Files read and written safely, the one place for it: the command line (runner.py), the datasets
and evaluate.py use it, so it needs nothing beyond the standard library.

Reading: `checked_file` lets only regular files be opened (a FIFO or a device would block or never
end) and turns what the system refuses into one line (`path_kind` tells what is at a path);
`read_text` reads such a file with a bound on its size (a file of the project's own, say summary.json,
that is huge is none of its: it is not read into memory); `listed_folder` does the same for folders.
weights.py's loader and evaluate.py's readers check through them.

Messages: `shown` makes a file name safe to print on one line, and `OneLineParser` gives the scripts'
option errors as one such line, like every other error of theirs.

Writing: whole or not at all. Everything is first written under a hidden temporary name beside its
final place, `.<name>.<host>.<pid>.tmp`, then renamed into place (a rename within a folder is
atomic): a reader finds the previous complete file (or folder) or the new complete one, never a mix.
Only a regular file is ever replaced (`replaceable`): a device, FIFO, socket or folder at the path is
left as it is, and the write refused in one line (a run as root never replaces /dev/null). A folder
is replaced only where every entry in it, at any depth, is one the caller writes (`swap_in`).
The host and process id in the name tell which temporaries a killed run left behind: the next run
on the same machine removes those whose process is gone. Output folders are named by `folder_name`,
which no temporary, hidden or summary file can share.
"""
import argparse
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
from pathlib import Path

# What the command line writes, and evaluate.py and the run's page (page.py) read:
PREDICTION_FILE = "labels.png"  # per image: the labels, an 8-bit palette image
EMBEDDINGS_FILE = "embeddings.npy"  # per image: (K, C) float32, row i segment i's mask embedding
CLASSES_FILE = "classes.json"  # per image, with --classes: the class names, each segment's class and its votes
MASKCLIP_FILE = "maskclip.png"  # per image, with --classes: MaskCLIP's class id per pixel, 16-bit, at labels.png's size
RUN_RECORD = "run.json"  # per image: how its folder was made; written last, with the rest
SUMMARY = "summary.json"  # in --out: what the last run did
MAX_RECORD = 64 * 2 ** 20  # bytes: the largest JSON file of a run read (the scores of 5,000 images take 3 MB)
MAX_SEGMENTS = 256  # what an 8-bit labels.png can hold
HOST = socket.gethostname().replace(".", "-")
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d{1,10})\.tmp")
MAX_PID = 2 ** 31 - 1  # a larger number in a temporary's name is no process id: not ours
# A folder name leaves room for what its temporaries add, `.` + `-old.` + host (at most 64 bytes) +
# `.` + pid (10 digits) + `.tmp`, within the 255 bytes file systems allow a name.
MAX_FOLDER_NAME = 255 - (1 + 5 + 64 + 1 + 10 + 4)
UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')  # characters some file system refuses in a name


class FileError(Exception):
    """A file or folder that cannot be read; the message is one line: its name, then `reason`."""

    def __init__(self, path, reason: str):
        super().__init__(f"{shown(path)}: {reason}")
        self.reason = reason


def shown(path) -> str:
    """A file name safe to print on one line: control (and other unprintable) characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(path))


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line, `<script>: error: ...`, and exit status 2 (argparse prints
    its usage block first)."""

    def error(self, message):
        self.exit(2, f"{Path(self.prog).stem}: error: {shown(message)} (see --help)\n")


KIND_PROBLEMS = {"folder": "a folder where a file belongs", "other": "not a regular file (a FIFO, socket or device)"}


def path_kind(path) -> str | None:
    """"file", "folder" or "other" for what is at `path`; None where nothing is. A path that may not be
    looked at (a folder on the way without permission) is a FileError of one line."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise FileError(path, f"cannot be looked at ({e.strerror}): check its folders' permissions") from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def checked_file(path, missing: str = "no such file") -> Path:
    """`path` if it is a regular file this process may open; else a FileError of one line (`missing`
    where nothing is there)."""
    kind = path_kind(path)
    if kind != "file":
        raise FileError(path, KIND_PROBLEMS.get(kind, missing))
    try:
        with open(path, "rb"):
            return Path(path)
    except OSError as e:
        raise FileError(path, f"cannot be read ({e.strerror}): check its permissions") from None


def read_text(path, limit: int) -> str:
    """The UTF-8 text of the regular file at `path` (checked_file), of at most `limit` bytes; else a
    FileError of one line. Never more than `limit` + 1 bytes are read: a file that large is not read."""
    try:
        with open(checked_file(path), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FileError(path, f"cannot be read ({e.strerror})") from None
    if len(data) > limit:
        raise FileError(path, f"over {limit:,} bytes, larger than any file of emerdiff's: move it away")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileError(path, "not UTF-8 text, as emerdiff writes its files: move it away") from None


def replaceable(path) -> Path:
    """`path` where nothing or a regular file is there, what atomic_save may replace; else (a folder, a
    FIFO, a socket, a device) a FileError of one line: such a thing is never opened nor replaced."""
    kind = path_kind(path)
    if kind not in (None, "file"):
        raise FileError(path, KIND_PROBLEMS[kind])
    return Path(path)


def listed_folder(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted; a folder that cannot be listed is a FileError of one line."""
    try:
        return sorted(folder.iterdir())
    except PermissionError:
        raise FileError(folder, "permission denied") from None
    except OSError as e:
        raise FileError(folder, f"cannot list it ({e.strerror})") from None


def folder_name(stem: str) -> str:
    """The output folder of an image of this stem (runner.py writes it, evaluate.py reads it): safe on
    any file system and never taken for a run's own files. Characters some file system refuses become
    "_"; a name that is empty, hidden (such as "." or a temporary's), a summary file's or the run's
    page's (index.html) gets a "_" in front; a name too long for its temporaries is cut, a hash of the
    whole stem kept at its end."""
    name = UNSAFE.sub("_", stem)
    if not name or name.startswith((".", "summary.")) or name.casefold() == "index.html":  # the run's page
        name = "_" + name
    if len(os.fsencode(name)) > MAX_FOLDER_NAME:
        digest = hashlib.sha1(os.fsencode(stem)).hexdigest()[:16]
        while len(os.fsencode(name)) > MAX_FOLDER_NAME - len(digest) - 1:
            name = name[:-1]
        name = f"{name}-{digest}"
    return name


def temporary_path(final: Path) -> Path:
    """`.name.host.pid.tmp` beside `final`: hidden, and removable once its process is gone."""
    return final.with_name(f".{final.name}.{HOST}.{os.getpid()}.tmp")


def remove_dead_temporaries(folder: Path):
    """Remove the temporaries in `folder` that runs on this machine left when they were killed. Called
    before this process writes there, so one bearing its own pid is a leftover of an earlier process
    of that number (a container restarted, say), and goes too."""
    for entry in listed_folder(folder):
        if is_dead_temporary(entry.name):
            remove(entry)


def is_dead_temporary(name: str) -> bool:
    """Whether `name` is a temporary of a process of this machine that is gone (or of this process,
    from an earlier life): the one place that decides it."""
    match = TEMPORARY.fullmatch(name)
    if not match or match["host"] != HOST or int(match["pid"]) > MAX_PID:
        return False
    pid = int(match["pid"])
    return pid == os.getpid() or not process_alive(pid)


def remove(path: Path):
    """Remove a file, a link (not what it points to) or a folder with what it holds, as far as the
    system lets this process (what it refuses, say another user's, stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def atomic_save(path: Path, write):
    """write(temporary path), then rename it to `path`: never a half-written file. Where something other
    than a regular file is at `path`, a FileError of one line (replaceable), nothing written."""
    tmp = temporary_path(replaceable(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_folder(folder: Path, files: dict, ours):
    """Write `files` (name -> writer of a path) into a temporary folder, then swap it in as `folder`
    whole. An earlier `folder` is replaced only if `ours` (a path relative to it, "/"-separated -> bool)
    holds for every entry in it, at any depth (swap_in)."""
    tmp = temporary_path(folder)
    tmp.mkdir()
    try:
        for name, write in files.items():
            write(tmp / name)
        swap_in(tmp, folder, ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when something failed


def stranger(folder: Path, ours) -> str | None:
    """The first entry of `folder`, at any depth (folders included, links not followed), whose path
    relative to it, "/"-separated, `ours` does not hold for; None where it holds for all. A subfolder that
    cannot be listed is an OSError: what it holds is unknown."""
    def unlistable(error):
        raise error
    for root, folders, names in os.walk(folder, onerror=unlistable):
        for name in sorted(folders + names):
            relative = Path(root, name).relative_to(folder).as_posix()
            if not ours(relative):
                return relative
    return None


def swap_in(tmp: Path, final: Path, ours, tries: int = 100):
    """Rename the complete folder `tmp` to `final`. An earlier folder there is renamed aside and
    removed first (`final` is absent for that instant: never a mix of two runs' files); a file, or a
    folder holding anything, at any depth, that `ours` does not name (stranger), is an error naming it,
    and nothing is moved. Concurrent runs: the last one wins."""
    for _ in range(tries):
        try:
            os.rename(tmp, final)  # atomic; refused while `final` is a non-empty folder or a file
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        if not final.is_dir():
            raise OSError(errno.EEXIST, "a file of that name is in the way", str(final))
        other = stranger(final, ours)
        if other is not None:
            raise OSError(errno.EEXIST, f"that folder holds files emerdiff does not write ({shown(other)}, "
                          "for one); move them away", str(final))
        aside = temporary_path(final.with_name(final.name + "-old"))
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another run moved it first
            continue
        remove(aside)  # a link to a folder: the link
    raise OSError(errno.EBUSY, "other runs keep replacing it", str(final))
