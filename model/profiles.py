"""Profiles: the files in configs/ that `make profile NAME=...` copies onto params.yaml.

A profile is either a whole params file, or `base: OTHER.yaml` followed by only the keys that
differ from OTHER (nested sections merge key by key), so a default shared by a family of profiles
is written once. The result keeps the comments of both files, and `dvc params diff` shows the
switch as usual.

usage: python -m model.profiles NAME   (writes configs/NAME.yaml, resolved, onto params.yaml)
"""

import io
from pathlib import Path

from ruamel.yaml import YAML

from model.errors import PipelineError, run_stage
from model.files import atomic_output
from model.params import PARAMS_FILE, parse_params

CONFIGS = Path("configs")


def _yaml():
    yaml = YAML()  # round-trip: keeps comments and key order
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


def _merge(target, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
            if key in override.ca.items:  # the override's own end-of-line comment
                target.ca.items[key] = override.ca.items[key]


def resolve(path):
    """The profile at `path` with its bases applied, as a round-trip YAML mapping."""
    path = Path(path)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise PipelineError(f"no profile {path}; the profiles in {path.parent}: {names}")
    profile = _yaml().load(path.read_text(encoding="utf-8"))
    base = profile.pop("base", None)
    if base is None:
        return profile
    resolved = resolve(path.parent / base)
    _merge(resolved, profile)
    resolved.ca.comment = profile.ca.comment  # the profile's own header comment, not its base's
    return resolved


def profile_text(path):
    stream = io.StringIO()
    _yaml().dump(resolve(path), stream)
    return stream.getvalue()


def main(name):
    text = profile_text(CONFIGS / f"{name}.yaml")
    parse_params(YAML(typ="safe").load(text))  # a profile that does not validate is never written
    with atomic_output(PARAMS_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"params.yaml is now the {name} profile; `dvc params diff` shows the change")


if __name__ == "__main__":
    run_stage(main)
