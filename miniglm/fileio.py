"""Small file helpers shared by every stage: user errors, the writers every output goes through, JSON
and JSON Lines reading, and telling the encoding of a user's text.

The writer discipline: a command never deletes what it did not write, and never leaves a half-written
output. A set of files (a corpus, shards, a checkpoint, an export) is written into a temporary folder
beside its destination and swapped in whole (atomic_dir); one file is written under a temporary name
and renamed (atomic_path). Folders miniglm writes carry a `.miniglm` marker (which command, when,
which files): a rerun may replace a marked folder, an unmarked non-empty one needs --overwrite.
An OSError while writing becomes one UserError line naming the output. Temporary names are
`.NAME.PID.RANDOM.tmp`; those of a dead process are removed when NAME is written again.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
MARKER = ".miniglm"
_START = time.time()  # a temporary file of our own pid older than this is a previous process's


class UserError(Exception):
    """A mistake in the user's input: the CLI prints it as one line and exits non-zero."""


# --- the command being run: its name for markers, the outputs the user allowed to be replaced --------
_command = "miniglm"
_overwrite: set[Path] = set()
_writes = 0


def begin_command(name: str) -> None:
    """Called by the CLI before each command (tests run several in one process)."""
    global _command, _writes, _depth
    _command, _writes, _depth = name, 0, 0
    _overwrite.clear()


def end_command() -> None:
    """After a command: library calls (tests, scripts) write as no command, replacing any marked folder."""
    global _command
    _command = "miniglm"
    _overwrite.clear()


def _write_point() -> None:
    """Every file write and rename passes here. MINIGLM_TEST_KILL_AT=N ends the process at the N-th,
    as a kill -9 would: the fault-injection tests check that no output is ever left half-written."""
    global _writes
    _writes += 1
    if os.environ.get("MINIGLM_TEST_KILL_AT") == str(_writes):
        os._exit(137)


# --- OSError -> one line -----------------------------------------------------------------------------
_WHY = {
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.ENOSPC: "no space left on the device; free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exceeded; free some space or write somewhere else",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EISDIR: "is a folder; name a file to write",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a file is in the way (a part of the path is a file); choose another path",
}


def output_error(path: str | Path, e: OSError) -> UserError:
    why = _WHY.get(e.errno or 0, f"cannot write it ({e.strerror or e}); check the path and the disk")
    return UserError(f"{path}: {why}")


_depth = 0  # writers nest (a file inside a set): the outermost names the output the user asked for


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError of the block into a UserError naming the output `path`."""
    global _depth
    _depth += 1
    try:
        yield
    except OSError as e:
        if _depth > 1:
            raise
        raise output_error(path, e) from None
    finally:
        _depth -= 1


# --- markers and the outputs a command may replace ---------------------------------------------------
def is_marked(path: Path) -> bool:
    return (path / MARKER).is_file()


_TMP_NAME = re.compile(r"^\..+\.\d+\.\w+\.tmp$")  # .NAME.PID.RANDOM.tmp


def _is_empty_dir(path: Path) -> bool:
    """Nothing in it, or only temporary files of ours (a kill before the marker was written)."""
    return path.is_dir() and all(_TMP_NAME.match(p.name) or p.name == LOCK for p in path.iterdir())


# --- the one output check every command goes through --------------------------------------------------
# What each command writes. A marked folder is replaced only by a command writing the same kind (an
# export replaces an export, never a run); a marker with no known command (written by library calls, or
# by an older miniglm) is replaced as before. The kind of a set written inside a composite command's folder
# (the demo's world/, corpus/, ...; a run's tokenizer/) is read from the files its marker lists.
KINDS = {"world": "synthetic world", "corpus prepare": "corpus", "corpus tokenize": "token shards",
         "tokenizer train": "tokenizer", "sft prepare": "SFT data", "train": "training run", "finetune": "training run",
         "merge": "merged run", "import-ckpt": "imported run", "export": "transformers export", "eval": "evaluation",
         "eval ppl": "evaluation", "eval classify": "evaluation", "demo": "demo"}
_COMPOSITE = {"demo", "train", "finetune"}
_SIGNATURES = (("evaluation", {"metrics.json", "perplexity.json", "predictions.jsonl"}),
               ("synthetic world", {"characters.jsonl"}), ("corpus", {"stats.json"}), ("token shards", {"train.bin"}),
               ("SFT data", {"meta.json"}), ("tokenizer", {"tokenizer.json"}))
LOCK = ".miniglm.lock"  # the advisory lock of a folder being written over time (a training run)


def read_marker(path: Path) -> dict:
    try:
        m = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _folder_kind(marker: dict) -> str | None:
    """The kind of a marked folder: its command's, or for a set nested in a composite command's folder, what
    its files say. None: not known (any command may replace it)."""
    command = marker.get("command")
    if command in _COMPOSITE and isinstance(marker.get("files"), list):
        files = set(marker["files"])
        return next((kind for kind, names in _SIGNATURES if files & names), None)
    return KINDS.get(command) if isinstance(command, str) else None


def _kind_refusal(path: Path) -> str | None:
    """Why the running command may not replace the marked folder `path`, or None."""
    mine = KINDS.get(_command)
    if mine is None or not is_marked(path):
        return None
    marker = read_marker(path)
    if marker.get("command") == _command:
        return None
    theirs = _folder_kind(marker)
    if theirs is None or theirs == mine:
        return None
    def a(kind: str) -> str:
        return ("an " if kind[0] in "aeiou" else "a ") + kind

    return (f"{path}: holds {a(theirs)} (written by `miniglm {marker.get('command')}`); `miniglm {_command}` "
            f"replaces only {a(mine)}; choose another --out, or pass --overwrite to replace it")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _protected(real: Path) -> str | None:
    """The file system root, the home folder and the current folder (or a folder holding them)."""
    if real == Path(real.anchor):
        return "the file system root"
    places = (("the current folder", _real(os.getcwd())), ("your home folder", _real(Path.home())))
    for name, place in places:
        if place == real:
            return name
    return next((f"a folder holding {name}" for name, place in places if _within(place, real)), None)


def check_output(path: str | Path, inputs: Iterable[Any] = (), overwrite: bool = False, magic: bytes | None = None,
                 grow: bool = False) -> Path:
    """The one check of an output, before any work (a UserError, one line, names the refusal):
    - never the file system root, the home folder or the current folder (not even with --overwrite);
    - never an input of the command, a folder holding one (unless `grow`: a run folder only adds its own
      files, such as finetune's RUN/data beside the checkpoints), or a path inside an input folder; paths
      compared resolved, symlinks followed. `inputs`: paths (None skipped) the command reads;
    - a folder (magic None) is refused if a file is there, or if it is not empty and not ours (marked), or
      marked by a command writing another kind of output (unless --overwrite);
    - a file (magic: how our files of that kind start) is refused if a folder is there, or a file not
      starting with magic (unless --overwrite).
    --overwrite lets this output replace what is there."""
    path = Path(path)
    _check_place(path, inputs, grow)
    with writing(path):
        if magic is not None:
            if path.is_dir():
                raise UserError(f"{path}: is a folder; --out names the file to write")
            if path.exists():
                with open(path, "rb") as f:
                    ours = f.read(len(magic)) == magic
                if not ours and not overwrite:
                    raise UserError(f"{path}: exists and is not a file miniglm writes; choose another --out, "
                                    "or pass --overwrite to replace it")
            return path
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: is a file, not a folder; choose another --out")
        if path.is_dir() and not _is_empty_dir(path):
            if not overwrite:
                if not is_marked(path):
                    raise UserError(f"{path}: exists and was not written by miniglm (no {MARKER} marker); "
                                    "choose another --out, or pass --overwrite to replace it")
                why = _kind_refusal(path)
                if why is not None:
                    raise UserError(why)
            else:
                allow_overwrite(path)
    return path


def _check_place(path: Path, inputs: Iterable[Any], grow: bool) -> None:
    """check_output's rules on where an output is: never the root, home or current folder; never an input."""
    real = _real(path)
    where = _protected(real)
    if where is not None:
        raise UserError(f"{path}: is {where}; miniglm never writes an output over it; choose another --out")
    for item in inputs:
        if item is None or str(item) == "":
            continue
        inp = _real(item)
        if inp == real:
            raise UserError(f"{path}: is also an input of this command ({item}); writing it would destroy the "
                            "input; choose another --out")
        if _within(inp, real) and not grow:
            raise UserError(f"{path}: holds an input of this command ({item}); replacing it would delete the "
                            "input; choose another --out")
        if _within(real, inp) and not inp.is_file():
            raise UserError(f"{path}: is inside an input of this command ({item}); choose another --out "
                            "outside it")


def _replaceable(path: Path) -> bool:
    """Ours (marked by a command writing this kind of output), empty, or inside an output named with
    --overwrite."""
    if not path.exists() or _is_empty_dir(path):
        return True
    full = path.resolve()
    if any(p in _overwrite for p in (full, *full.parents)):
        return True
    return is_marked(path) and _kind_refusal(path) is None


def _marker(files: list[str] | None) -> dict:
    m: dict[str, Any] = {"command": _command, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if files is not None:
        m["files"] = files
    return m


def allow_overwrite(path: str | Path) -> None:
    """--overwrite: this output may replace what is there, marked or not."""
    _overwrite.add(Path(path).resolve())


def mark_dir(path: str | Path) -> Path:
    """Create a folder that grows over time (a training run) and mark it, once, as ours."""
    path = check_output(path, overwrite=Path(path).resolve() in _overwrite)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    if not is_marked(path):
        write_json(path / MARKER, _marker(None))
    return path


@contextmanager
def output_lock(path: str | Path, inputs: Iterable[Any] = (), writer: bool = True) -> Iterator[Path]:
    """Hold a folder written over time (a training run) for the block: check it as check_output does
    (a folder holding a resumable checkpoint, ckpt/state.json, may be resumed without a marker), then take
    an advisory lock, flock on FOLDER/.miniglm.lock, that a second writer is refused with one line. The kernel
    drops the lock when its process ends, however it ends: a killed run never blocks the next. `writer`:
    False for the processes of a torchrun job other than rank 0, which write nothing (rank 0 holds the lock
    for the job). A folder this call created and nothing was written into is removed again."""
    import fcntl  # lazy: Unix only (Windows has no fcntl), not start-up time

    path = Path(path)
    if not writer:
        yield path
        return
    resume = (path / "ckpt" / "state.json").exists()
    if resume:
        _check_place(path, inputs, grow=True)
        why = None if path.resolve() in _overwrite else _kind_refusal(path)
        if why is not None:
            raise UserError(why)
    else:
        check_output(path, inputs, overwrite=path.resolve() in _overwrite, grow=True)
    created = not path.exists()
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{path}: another miniglm process is writing this run now; wait for it to finish, "
                            "or choose another out_dir") from None
        try:
            yield path
        finally:
            if created and [p.name for p in path.iterdir()] == [LOCK]:  # nothing written: leave nothing
                (path / LOCK).unlink(missing_ok=True)
                path.rmdir()
    finally:
        os.close(fd)  # releases the lock


def remove_output(path: str | Path) -> None:
    """Delete a folder miniglm wrote (a stage a rerun makes anew); refuse one it did not."""
    path = Path(path)
    if not path.exists():
        return
    if not _replaceable(path):
        raise UserError(_kind_refusal(path) or f"{path}: exists and was not written by miniglm (no {MARKER} "
                        "marker); move it away, or pass --overwrite to replace it")
    _write_point()
    with writing(path):
        shutil.rmtree(path)


# --- temporary names -----------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    return "." + path.name[:80]  # room for .PID.RANDOM.tmp within the file system's 255 bytes


def old_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{_stem(path)}.old")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_orphans(path: Path) -> None:
    """Remove the temporary files of `path` left by a process that died while writing it, and the
    previous version left beside a complete one by a kill between the swap and the clean-up."""
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f"{_stem(path)}.*.tmp"):
        parts = p.name[len(_stem(path)) + 1:].split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        own_stale = pid == os.getpid() and p.lstat().st_mtime < _START
        if own_stale or (pid != os.getpid() and not _pid_alive(pid)):
            _remove(p)
    old = old_path(path)
    if path.exists() and old.exists():
        _remove(old)


def _remove(p: Path) -> None:
    _write_point()
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _tmp_prefix(path: Path) -> str:
    return f"{_stem(path)}.{os.getpid()}."


# --- the writers --------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise OSError(errno.EISDIR, "is a folder")
        clean_orphans(path)
        _write_point()
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the usual permissions
            _write_point()
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)


def recover_dir(path: str | Path) -> Path:
    """Replacing a folder takes two renames (old away, new in) and a clean-up; a process killed between
    the renames leaves only `.NAME.old`: put it back, so the last complete version is found. One killed
    before the clean-up leaves `.NAME.old` beside the new NAME: remove it."""
    path = Path(path)
    old = old_path(path)
    if not path.exists() and old.exists():
        os.replace(old, path)
    elif old.exists():
        _remove(old)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in (MARKER, LOCK))


def _carry_over(old: Path, new: Path) -> None:
    """Copy what the old folder holds and the new set does not write (another eval's perplexity.json)."""
    for p in old.iterdir():
        if p.name in (MARKER, LOCK) or _TMP_NAME.match(p.name) or (new / p.name).exists():
            continue
        if p.is_dir():
            copy_dir(p, new / p.name)
        else:
            copy_file(p, new / p.name)


@contextmanager
def atomic_dir(path: str | Path, keep: bool = False, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; with its marker written, it replaces `path` only if the
    block succeeds. An existing `path` must be replaceable: ours (marked), empty, or named with --overwrite.
    keep: the new folder keeps the old one's files it does not write itself (a folder several commands
    write into, such as RUN/eval). replace: whatever `path` holds (a checkpoint inside a run already checked)."""
    path = Path(path)
    with writing(path):
        recover_dir(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: is a file, not a folder; choose another --out")
        if not replace and not _replaceable(path):
            raise UserError(_kind_refusal(path) or f"{path}: exists and was not written by miniglm (no {MARKER} "
                            "marker); choose another --out, or pass --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_orphans(path)
        _write_point()
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            if keep and path.is_dir():
                _carry_over(path, tmp)
            write_json(tmp / MARKER, _marker(_listing(tmp)))
            os.chmod(tmp, 0o777 & ~UMASK)
            if path.exists():
                old = old_path(path)
                _write_point()
                os.replace(path, old)
                _write_point()
                os.replace(tmp, path)
                _remove(old)
            else:
                _write_point()
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_with(path: str | Path, save: Callable[[Path], Any]) -> None:
    """A file written by another library's saver (safetensors, torch.save, save_pretrained), usually
    inside an atomic_dir: a write point, and its OSError as one line."""
    path = Path(path)
    _write_point()
    with writing(path):
        save(path)


def copy_file(src: str | Path, dst: str | Path) -> None:
    _write_point()
    with writing(dst):
        shutil.copyfile(src, dst)


def copy_dir(src: str | Path, dst: str | Path) -> None:
    """A folder's files, one write point each (usually into an atomic_dir)."""
    src, dst = Path(src), Path(dst)
    with writing(dst):
        dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_dir():
            copy_dir(p, dst / p.name)
        else:
            copy_file(p, dst / p.name)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        _write_point()
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        _write_point()
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


# --- reading user text ---------------------------------------------------------------------------
# Every reader of user text decodes through decode_text, so every command reports a bad byte the same
# way: the file, the byte offset, what the bytes look like, and the --encoding that reads them.
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# UTF-32LE's BOM begins with UTF-16LE's: the UTF-32 ones are looked for first.
BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"), (codecs.BOM_UTF8, "utf-8-sig"))


def bom_encoding(data: bytes) -> str | None:
    """The encoding a byte order mark at the start of `data` names (utf-32, utf-16, utf-8-sig), or None."""
    return next((enc for bom, enc in BOMS if data.startswith(bom)), None)
NEWLINE = b"\n"


def is_wide(encoding: str) -> bool:
    """UTF-16/32: NUL bytes are normal there, and lines do not end at a b"\\n" byte."""
    try:
        return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    except LookupError:
        return False  # the reader names the unknown encoding


def _lookup(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"--encoding {encoding}: unknown encoding (e.g. gbk, gb18030, big5, utf-16-le)") from None


# --- telling the encoding ------------------------------------------------------------------------
# GB18030 decodes almost any byte string and Big5 text often decodes as GBK, so a clean decode
# proves little. Each candidate that decodes is scored by how much of its text is plausible:
# ASCII, common punctuation, and hanzi from the "frequently used" blocks of GB2312 (level 1)
# or Big5. A wrong decode produces kana, Greek, private-use and rare characters instead.
CANDIDATES = ("utf-8", "gb18030", "big5")


def _is_common_hanzi(ch: str) -> bool:
    try:
        gb = ch.encode("gb2312")
        if len(gb) == 2 and 0xB0 <= gb[0] <= 0xD7:
            return True
    except UnicodeEncodeError:
        pass
    try:
        b5 = ch.encode("big5")
        return len(b5) == 2 and 0xA440 <= (b5[0] << 8 | b5[1]) <= 0xC67E
    except UnicodeEncodeError:
        return False


_COMMON_PUNCT = set("，。、；：？！“”‘’（）《》〈〉【】「」『』…—·　～－")


def plausibility(text: str, sample: int = 20000) -> float:
    """Fraction of non-space characters that look like real Chinese or ASCII text."""
    good = total = 0
    for ch in text[:sample]:
        if ch.isspace():
            continue
        total += 1
        if ch.isascii() or ch in _COMMON_PUNCT or _is_common_hanzi(ch):
            good += 1
    return good / total if total else 1.0


@dataclass
class Decoded:
    text: str
    encoding: str
    score: float


def best_decoding(data: bytes, name: str, errors: str = "strict") -> Decoded:
    """The candidate encoding that reads `data` (no BOM) as the most plausible text; strict UTF-8 outright.
    None decoding (strict) is a UserError naming each one's first bad byte; with `errors`, the best of the
    lossy decodes."""
    results: list[Decoded] = []
    first_bad: dict[str, int] = {}
    for enc in CANDIDATES:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError as e:
            first_bad[enc] = e.start
            continue
        if enc == "utf-8":  # strict UTF-8 on non-ASCII bytes is almost never an accident
            return Decoded(text, enc, 1.0)
        results.append(Decoded(text, enc, plausibility(text)))
    if not results:
        if errors == "strict":
            where = ", ".join(f"{enc} at byte {pos}" for enc, pos in first_bad.items())
            raise UserError(f"{name}: cannot decode as {'/'.join(CANDIDATES)} (first bad byte: {where}); "
                            "fix the file or pass --errors replace")
        for enc in CANDIDATES:
            text = data.decode(enc, errors=errors)
            results.append(Decoded(text, enc, plausibility(text) - text.count("\ufffd") / max(len(text), 1)))
    return max(results, key=lambda d: d.score)  # ties keep candidate order (gb18030 before big5)


def detect_encoding(data: bytes) -> str | None:
    """The encoding corpus.decode_bytes would pick (gbk when GBK reads the bytes: the name users know), or None.
    Bytes with NUL bytes may be UTF-16 without a BOM: the byte order that reads as plausible text."""
    bom = bom_encoding(data)
    if bom == "utf-32":
        return "utf-32"
    if b"\x00" in data:
        scores = {}
        for enc in ("utf-16-le", "utf-16-be"):
            try:
                scores[enc] = plausibility(data[:len(data) // 2 * 2].decode(enc))
            except UnicodeDecodeError:
                continue
        best = max(scores, key=scores.get, default=None)
        return best if best and scores[best] > 0.8 else None
    if bom is not None:  # what corpus.decode_bytes reads with a BOM: that encoding, if the rest decodes
        try:
            data.decode(bom)
        except UnicodeDecodeError:
            return None
        return bom
    try:
        enc = best_decoding(data, "").encoding
    except UserError:
        return None
    if enc == "gb18030":
        try:
            data.decode("gbk")
            return "gbk"
        except UnicodeDecodeError:
            pass
    return enc


def _fix(guess: str | None, encoding_flag: bool) -> str:
    """How to read bytes that look like `guess`: the command's --encoding, else converting the file."""
    if guess is None:
        return "--encoding names its encoding" if encoding_flag else "convert it to UTF-8"
    if encoding_flag:
        return f"it looks like {guess}; --encoding {guess} reads it"
    return f"it looks like {guess}; convert it: iconv -f {guess} -t utf-8"


def decode_text(data: bytes, path: str | Path, encoding: str | None = None, errors: str = "strict",
                offset: int = 0, line: int = 1, encoding_flag: bool = True) -> str:
    """Bytes of `path` (from byte `offset`, on line `line`) as text: UTF-8 by default (a BOM is dropped, a
    UTF-16 BOM is followed), else `encoding`. A byte that does not decode is a UserError naming its line and
    offset and the fix: the command's --encoding (encoding_flag), or else converting the file (the files
    other stages wrote)."""
    if encoding is None:
        enc = (bom_encoding(data) or "utf-8-sig") if offset == 0 else "utf-8"
    else:
        enc = _lookup(encoding)
    if encoding is None and b"\x00" in data and not is_wide(enc):
        at = data.index(0)
        where = f"{path}:{line + data.count(NEWLINE, 0, at)}"
        guess = detect_encoding(data)
        if guess is None:
            raise UserError(f"{where}: looks like a binary file (NUL byte at byte {offset + at}); pass a text file")
        raise UserError(f"{where}: not UTF-8 at byte {offset + at} (a NUL byte; {_fix(guess, encoding_flag)})")
    try:
        return data.decode(enc, errors=errors)
    except UnicodeDecodeError as e:
        at = offset + e.start
        bad = data[e.start:e.start + 2].hex(" ")
        if encoding is not None:
            raise UserError(f"{path}: not valid {encoding} at byte {at} ({bad}); check --encoding") from None
        where = f"{path}:{line + data.count(NEWLINE, 0, e.start)}"
        fix = _fix(detect_encoding(data), encoding_flag)
        raise UserError(f"{where}: not UTF-8 at byte {at} ({bad}; {fix})") from None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")


def read_text(path: str | Path, encoding: str | None = None, errors: str = "strict",
              encoding_flag: bool = True) -> str:
    """The text of a user's file: UTF-8 unless `encoding` names another (see decode_text)."""
    path = Path(path)
    _check_readable(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return decode_text(data, path, encoding, errors, encoding_flag=encoding_flag)


def append_jsonl(path: str | Path, row: dict) -> None:
    """One line at the end of a log (metrics.jsonl). A kill mid-append leaves a torn last line, which
    read_log skips (and a resumed run rewrites the log without it)."""
    path = Path(path)
    _write_point()
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path: str | Path) -> list[dict]:
    """The rows of a JSON Lines log; a torn last line (a kill or a full disk mid-append) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not valid JSON; fix or remove that line") from None
    return rows


def _json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path: str | Path, encoding: str | None = None,
               encoding_flag: bool = True) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line; a bad line is a UserError naming it.
    Read line by line (a corpus split may be large), each decoded as read_text decodes a file."""
    path = Path(path)
    _check_readable(path)
    with open(path, "rb") as f:
        wide = is_wide(bom_encoding(f.read(4)) or "utf-8") if encoding is None else is_wide(_lookup(encoding))
    if wide:  # UTF-16/32 lines do not end at a b"\n" byte: decode the file whole
        yield from _json_lines(path, read_text(path, encoding, encoding_flag=encoding_flag).split("\n"))
        return

    def lines() -> Iterator[str]:
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield decode_text(raw, path, encoding, offset=offset, line=lineno, encoding_flag=encoding_flag)
                offset += len(raw)

    yield from _json_lines(path, lines())


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path, encoding: str | None = None,
                 encoding_flag: bool = True) -> list[tuple[str, Any]]:
    """The records of a JSON file, recognised by its content whatever the extension (.json, .jsonl, .txt):
    one array is a list of records, one object is one record, one object per line is JSON Lines
    (ChatGLM's AdvertiseGen dev.json, Q&A sets saved as .txt). Each record comes with where it is,
    "FILE:line N" or "FILE:record N", for error messages."""
    path = Path(path)
    text = read_text(path, encoding, encoding_flag=encoding_flag)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Valid JSON Lines fails as one document at line 2 ("Extra data"): its first line stands alone.
        if _first_line_is_object(text):
            return [(f"{path}:line {n}", row) for n, row in _json_lines(path, text.split("\n"))]
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected one JSON array, "
                        "one object, or one object per line") from None
    if isinstance(obj, list):
        return [(f"{path}:record {i}", row) for i, row in enumerate(obj)]
    if isinstance(obj, dict):
        start = text[:len(text) - len(text.lstrip())].count("\n") + 1
        return [(f"{path}:line {start}", obj)]
    raise UserError(f"{path}: expected JSON records (one array, one object, or one object per line), "
                    f"got a JSON {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path, encoding_flag=False))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    return path
