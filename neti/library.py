"""The concept library: the user's concept files and the read-only shipped ones, under checked names.

Concept files (NeTI Sec. 3, one mapper each) live in `concepts/` (read-write) and `assets/concepts/` (shipped
with the bundled model, read-only; a user concept of the same name hides a shipped one). A name is a plain file
stem: nothing the app is given can read or write outside those folders. A concept may have a thumbnail next
to it, `<name>.preview.png` (the last preview of its training), which moves and goes with it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .concept import Concept, file_info
from .paths import DEFAULT_CONCEPTS_DIR, SHIPPED_CONCEPTS_DIR

logger = logging.getLogger(__name__)

CONCEPT_SUFFIX = ".safetensors"
THUMBNAIL_SUFFIX = ".preview.png"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,79}$")


def check_name(name: str) -> str:
    """A concept name that is a plain file stem: no path separators, no '..', not absolute, not hidden."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the concept name is empty; give a name such as 'my-cat'")
    name = name.strip()
    if name.endswith(CONCEPT_SUFFIX):
        name = name[: -len(CONCEPT_SUFFIX)]
    if "/" in name or "\\" in name or ".." in name or os.path.isabs(name) or "\x00" in name:
        raise ValueError(f"concept name {name!r} is not allowed: it must be a plain name without '/', '\\' or '..' "
                         "(concepts stay inside the concepts folder)")
    if not _NAME.match(name):
        raise ValueError(f"concept name {name!r} is not allowed: use letters, digits, '-', '_', '.' and spaces "
                         "(at most 80 characters, not starting with '.' or '-')")
    return name


def name_from_token(token: str) -> str:
    """A file name for a token: '<dotted-crescent>' -> 'dotted-crescent'."""
    stem = re.sub(r"[^A-Za-z0-9_.\- ]+", "-", token or "").strip("-. ")
    return stem or "concept"


def _escapes(path: Path, folder: Path) -> bool:
    """Whether `path` (a link, say) resolves to somewhere outside `folder`."""
    try:
        path.resolve().relative_to(folder.resolve())
        return False
    except ValueError:
        return True


@dataclass(frozen=True)
class ConceptEntry:
    name: str
    path: Path
    shipped: bool  # read-only, from assets/concepts


class ConceptLibrary:
    """The concepts the app offers: `folder` (read-write) and `shipped_folder` (read-only, same names hidden)."""

    def __init__(self, folder: str | os.PathLike = DEFAULT_CONCEPTS_DIR,
                 shipped_folder: str | os.PathLike | None = SHIPPED_CONCEPTS_DIR):
        self.folder = Path(folder)
        self.shipped_folder = Path(shipped_folder) if shipped_folder else None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: dict[Path, tuple[tuple[int, int], Concept]] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[ConceptEntry]:
        """User concepts, then shipped ones not shadowed by a user concept of the same name; sorted by name."""
        found: dict[str, ConceptEntry] = {}
        folders = [(self.folder, False)] + ([(self.shipped_folder, True)] if self.shipped_folder else [])
        for folder, shipped in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"*{CONCEPT_SUFFIX}")):
                name = path.name[: -len(CONCEPT_SUFFIX)]
                if name.startswith(".") or not path.is_file() or name in found:
                    continue
                if _escapes(path, folder):
                    logger.warning("ignoring %s: a link to %s, outside the concepts folder", path, path.resolve())
                    continue
                found[name] = ConceptEntry(name, path, shipped)
        return sorted(found.values(), key=lambda e: (e.shipped, e.name.casefold()))

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def version(self) -> tuple:
        """Changes whenever a concept is added, removed, renamed or rewritten (for cheap UI refreshes)."""
        out = []
        for e in self.entries():
            try:
                st = e.path.stat()
            except OSError:
                continue
            out.append((e.name, e.shipped, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def entry(self, name: str) -> ConceptEntry:
        name = check_name(name)
        for e in self.entries():
            if e.name == name:
                return e
        for folder in (self.folder, self.shipped_folder):
            path = folder / f"{name}{CONCEPT_SUFFIX}" if folder else None
            if path is not None and path.is_symlink() and _escapes(path, folder):
                raise ValueError(f"concept {name!r} is a link to a file outside the concepts folder "
                                 f"({str(path.resolve())!r}); it is not read. Copy the file into the folder instead")
        raise ValueError(f"there is no concept named {name!r}; available: {', '.join(self.names()) or 'none'}")

    def load(self, name: str) -> Concept:
        """The concept, re-read only when its file changed (mtime and size)."""
        path = self.entry(name).path
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(path)
            if cached and cached[0] == key:
                return cached[1]
        concept = Concept.load(path).eval()
        with self._lock:
            self._cache[path] = (key, concept)
        return concept

    def token_owner(self, token: str) -> str | None:
        """The name of a concept in the library whose token is `token` (unreadable files are skipped)."""
        for e in self.entries():
            try:
                if self.load(e.name).token == token:
                    return e.name
            except (ValueError, OSError):
                continue
        return None

    def info(self, name: str) -> dict:
        e = self.entry(name)
        info = file_info(e.path)
        info["name"], info["shipped"] = e.name, e.shipped
        return info

    def thumbnail(self, name: str) -> Path | None:
        """The concept's thumbnail file, if it has one."""
        e = self.entry(name)
        path = e.path.with_name(e.name + THUMBNAIL_SUFFIX)
        return path if path.is_file() and not _escapes(path, path.parent) else None

    def save_thumbnail(self, name: str, image) -> Path:
        """Write `image` (PIL) as the thumbnail of the user concept `name`."""
        e = self._own(name, "given a thumbnail")
        path = e.path.with_name(e.name + THUMBNAIL_SUFFIX)
        image.save(path, format="PNG")
        return path

    def path_for_new(self, name: str) -> Path:
        """Where a new concept named `name` goes; refuses a name already in use."""
        name = check_name(name)
        if name in self.names():
            raise ValueError(f"a concept named {name!r} already exists; choose another name, or rename or delete "
                             "the existing one")
        path = (self.folder / f"{name}{CONCEPT_SUFFIX}").resolve()
        if path.parent != self.folder.resolve():  # belt and braces: check_name already refuses separators
            raise ValueError(f"concept name {name!r} would leave the concepts folder")
        return path

    def save(self, concept: Concept, name: str) -> Path:
        path = concept.save(self.path_for_new(name))
        logger.info("saved concept %s to %s", concept.token, path)
        return path

    def _own(self, name: str, action: str) -> ConceptEntry:
        e = self.entry(name)
        if e.shipped:
            raise ValueError(f"{e.name!r} is a shipped example concept and is read-only; it cannot be {action}")
        return e

    def rename(self, old: str, new: str) -> str:
        e = self._own(old, "renamed")
        target = self.path_for_new(new)
        os.replace(e.path, target)
        thumb = e.path.with_name(e.name + THUMBNAIL_SUFFIX)
        if thumb.is_file():
            os.replace(thumb, target.with_name(target.stem + THUMBNAIL_SUFFIX))
        with self._lock:
            self._cache.pop(e.path, None)
        logger.info("renamed concept %s -> %s", e.name, target.stem)
        return target.stem

    def delete(self, name: str) -> None:
        e = self._own(name, "deleted")
        e.path.unlink()
        e.path.with_name(e.name + THUMBNAIL_SUFFIX).unlink(missing_ok=True)
        with self._lock:
            self._cache.pop(e.path, None)
        logger.info("deleted concept %s", e.name)
