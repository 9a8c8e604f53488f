"""The optional project file (TOML): where the results, data and task list are, and each variant's settings.

    results_root = "result/complied"
    data_root = "data"
    tasks = "data/QA_final_sc_filled.json"

    [variants.my_variant]            # built-in: qwen3vl_text, qwen3vl_default_pic, qwen3vl_resize_pic
    min_pixels = 200704
    max_pixels = 1605632

    [configs]                        # result files outside <variant>/<modality_format>/results*.json
    "qwen3vl_text/text_html" = "old/text_html_final.json"

    [runs]                           # run directories whose answers count, and their configuration
    "result/rerun-text_html-truncate" = "qwen3vl_text/text_html"

    [protocols]                      # the answer protocol per configuration or variant (protocol.py presets)
    "qwen3vl_text/text_latex" = "default-batch"
    qwen3vl_default_pic = "default-sequential"

Relative paths are relative to the project file's folder; command-line options win over the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .benchmark import DEFAULT_VARIANTS, BenchmarkError, Config, Variant
from .protocol import PRESETS


@dataclass
class Project:
    results_root: Path | None = None
    data_root: Path | None = None
    tasks: Path | None = None
    variants: dict[str, Variant] = field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    configs: dict[Config, Path] = field(default_factory=dict)
    runs: list[tuple[Path, str | None]] = field(default_factory=list)
    protocols: dict[str, str] = field(default_factory=dict)  # config or variant name -> answer protocol preset

    def variant(self, name: str) -> Variant:
        """A variant's settings; an unknown variant runs with the processor's own limits."""
        return self.variants.get(name, Variant(name))


def read_toml(path: Path, what: str, known: list[str]) -> dict:
    """A TOML file whose top-level keys must be ``known``: a typo is an error, never a silent no-op."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise BenchmarkError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise BenchmarkError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return raw


def load_project(path: str | Path | None) -> Project:
    if path is None:
        return Project()
    path = Path(path)
    raw = read_toml(path, "project file", ["results_root", "data_root", "tasks", "variants", "configs", "runs",
                                           "protocols"])
    base = path.parent

    def resolve(value) -> Path:
        return base / Path(value).expanduser()

    project = Project()
    for key in ("results_root", "data_root", "tasks"):
        if key in raw:
            setattr(project, key, resolve(raw[key]))
    for name, settings in raw.get("variants", {}).items():
        bad = sorted(set(settings) - {"min_pixels", "max_pixels"})
        if bad:
            raise BenchmarkError(f"{path}: [variants.{name}] has unknown key(s) {', '.join(bad)}; "
                                 "known: min_pixels, max_pixels")
        project.variants[name] = Variant(name, settings.get("min_pixels"), settings.get("max_pixels"))
    for name, file in raw.get("configs", {}).items():
        project.configs[Config.parse(name)] = resolve(file)
    project.runs = [(resolve(run_dir), config) for run_dir, config in raw.get("runs", {}).items()]
    for name, protocol in raw.get("protocols", {}).items():
        if protocol not in PRESETS:
            raise BenchmarkError(f"{path}: [protocols] {name} = {protocol!r} is not an answer protocol; "
                                 f"presets: {', '.join(PRESETS)}")
        project.protocols[name] = protocol
    return project
