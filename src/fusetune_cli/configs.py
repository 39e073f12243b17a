"""Where the configs are, and what each option of a group says about itself, read without importing fusetune."""

from importlib.util import find_spec
from pathlib import Path

ROOT_CONFIG = "train.yaml"


def packaged_config_dir() -> Path:
    """The configs fusetune ships: ``fusetune/conf`` in an installed wheel, the checkout's ``conf/`` in a source
    tree (an editable install, or ``src/`` on the path)."""
    package = Path(find_spec("fusetune").submodule_search_locations[0]).resolve()
    for folder in (package / "conf", package.parent.parent / "conf"):
        if (folder / ROOT_CONFIG).is_file():
            return folder
    raise FileNotFoundError(f"no {ROOT_CONFIG} in {package / 'conf'}: this fusetune install has no configs")


def description(path: Path) -> str:
    """A yaml's one-line description: its first comment line (Hydra's ``# @package`` directive aside)."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            return ""
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def groups(*config_dirs: Path) -> dict[str, dict[str, Path]]:
    """Every group (``model``, ``model/lora``, ...) of the folders and its options' files, sorted (an option of a
    later folder stands for one of the same name before it); Hydra's own ``hydra/`` aside."""
    found: dict[str, dict[str, Path]] = {}
    for folder in map(Path, config_dirs):
        for path in sorted(folder.rglob("*.yaml")):
            group = path.parent.relative_to(folder).as_posix()
            if group == "." or group == "hydra" or group.startswith("hydra/"):
                continue
            found.setdefault(group, {})[path.stem] = path
    return found


def defaults(config_dir: Path) -> dict[str, str]:
    """The root config's default option of each group (``{"model": "tiny_llama", ...}``)."""
    import yaml

    listed = yaml.safe_load((config_dir / ROOT_CONFIG).read_text()).get("defaults", [])
    chosen = {}
    for entry in listed:
        if isinstance(entry, dict):
            for key, value in entry.items():
                chosen[key.removeprefix("optional ").removeprefix("override ").strip()] = value
    return chosen
