"""Files written whole or not at all: a reader finds the previous complete file (or folder) or the
new complete one, never a mix, never half of one. And the few facts about files that both sides
share: the segment cap of the label files, file names shown safely on one line.

Everything is first written under a hidden temporary name beside its final place,
`.<name>.<host>.<pid>.tmp`, then renamed into place (a rename within a folder is atomic). The
host and process id in the name tell which temporaries a killed run left behind: the next run on
the same machine removes those whose process is gone. Used by the command line (runner.py) and by
evaluate.py, so it needs nothing beyond the standard library.
"""
import errno
import os
import re
import shutil
import socket
from pathlib import Path

MAX_SEGMENTS = 256  # labels.png, which emerdiff.py writes and evaluate.py reads, is an 8-bit palette image
HOST = socket.gethostname().replace(".", "-")
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp")


def shown(path) -> str:
    """A file name safe to print on one line: control (and other unprintable) characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(path))


def temporary_path(final: Path) -> Path:
    """`.name.host.pid.tmp` beside `final`: hidden, and removable once its process is gone."""
    return final.with_name(f".{final.name}.{HOST}.{os.getpid()}.tmp")


def remove_dead_temporaries(folder: Path):
    """Remove the temporaries in `folder` that runs on this machine left when they were killed."""
    for entry in folder.iterdir():
        match = TEMPORARY.fullmatch(entry.name)
        if match and match["host"] == HOST and not process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def atomic_save(path: Path, write):
    """write(temporary path), then rename it to `path`: never a half-written file."""
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_folder(folder: Path, files: dict, replaceable: set[str]):
    """Write `files` (name -> writer of a path) into a temporary folder, then swap it in as `folder`
    whole. An earlier `folder` is replaced only if it holds nothing but `replaceable` names."""
    tmp = temporary_path(folder)
    tmp.mkdir()
    try:
        for name, write in files.items():
            write(tmp / name)
        swap_in(tmp, folder, replaceable)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when something failed


def swap_in(tmp: Path, final: Path, replaceable: set[str], tries: int = 100):
    """Rename the complete folder `tmp` to `final`. An earlier folder there is renamed aside and
    removed first (`final` is absent for that instant: never a mix of two runs' files); a file or a
    folder holding other names than `replaceable` is an error. Concurrent runs: the last one wins."""
    for _ in range(tries):
        try:
            os.rename(tmp, final)  # atomic; refused while `final` is a non-empty folder or a file
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        if not final.is_dir():
            raise OSError(errno.EEXIST, "a file of that name is in the way", str(final))
        if not {entry.name for entry in final.iterdir()} <= replaceable:
            raise OSError(errno.EEXIST, "that folder holds files emerdiff does not write; move it away", str(final))
        aside = temporary_path(final.with_name(final.name + "-old"))
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another run moved it first
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EBUSY, "other runs keep replacing it", str(final))
