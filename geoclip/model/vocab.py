"""Open vocabulary: any list of class names at inference, worded the way the model's classes were trained."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from geoclip.errors import GeoclipError
from geoclip.model.clip import GeoCLIP, ModelConfig

#: The templates of models saved before they were recorded (params.yaml's classes.templates then).
DEFAULT_TEMPLATES = ("a satellite image of {}.", "a Sentinel-2 multispectral tile of {}.", "an aerial view of {}.")
MAX_CLASSES = 10_000  # one prompt embedding per class and template: beyond this, use search, not a softmax
MAX_NAME_CHARS = 200  # the sentence encoder truncates at 256 word pieces; a longer "name" is a mistake


@dataclass(frozen=True)
class Vocabulary:
    """Class names and, per class, the prompts whose embeddings are averaged into its class embedding."""

    names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]


def text_key(name: str) -> str:
    """A name as compared for duplicates: Unicode-normalised, case-folded, inner spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def check_names(names: list[str], where: str) -> list[str]:
    """Class names stripped and checked: at least two, no duplicates, none empty or overlong; else one-line errors."""
    if isinstance(names, str) or not isinstance(names, list | tuple):
        raise GeoclipError(f"{where}: expected a list of class names, got {type(names).__name__}")
    clean = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise GeoclipError(f"{where}: class {i + 1} is {name!r}; expected a non-empty name")
        if len(name.strip()) > MAX_NAME_CHARS:
            raise GeoclipError(f"{where}: class {i + 1} is {len(name.strip())} characters; at most {MAX_NAME_CHARS} "
                               "(put a longer wording in the class file's descriptions)")
        clean.append(" ".join(name.split()))
    if len(clean) < 2:
        raise GeoclipError(f"{where}: {len(clean)} class(es) {clean}; a softmax needs at least two "
                           "(add a contrasting class such as 'other land cover')")
    if len(clean) > MAX_CLASSES:
        raise GeoclipError(f"{where}: {len(clean)} classes; at most {MAX_CLASSES}")
    seen: dict[str, str] = {}
    for name in clean:
        if (k := text_key(name)) in seen:
            raise GeoclipError(f"{where}: {name!r} repeats {seen[k]!r}; class names must be distinct")
        seen[k] = name
    return clean


def parse_class_list(text: str) -> list[str]:
    """``"lake, forest, vineyard"`` (commas or new lines) as a checked list of names."""
    return check_names([part for line in text.splitlines() for part in line.split(",") if part.strip()], "--classes")


def _check_templates(templates: list[str], where: str) -> list[str]:
    """Templates as a list of strings, each with exactly one ``{}`` where the class wording goes."""
    if not isinstance(templates, list) or not templates:
        raise GeoclipError(f"{where}: templates must be a non-empty list of strings like 'a satellite image of {{}}.'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise GeoclipError(f"{where}: template {t!r} must contain '{{}}' exactly once (where the class goes)")
    return templates


def read_class_file(path: str | Path) -> tuple[list[str], dict[str, str], list[str] | None]:
    """Names, descriptions and templates from a YAML file shaped like params.yaml's ``classes`` (or a bare list)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GeoclipError(f"{path}: cannot read the class file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise GeoclipError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if isinstance(doc, list):
        doc = {"names": doc}
    if not isinstance(doc, dict) or "names" not in doc:
        raise GeoclipError(f"{path}: expected a list of class names or a mapping with names (and optionally "
                           "descriptions, templates), as in params.yaml's classes")
    unknown = set(doc) - {"names", "descriptions", "templates"}
    if unknown:
        raise GeoclipError(f"{path}: unknown key(s) {sorted(unknown)}; expected names, descriptions, templates")
    names = check_names(doc["names"], f"{path}: names")
    descriptions = doc.get("descriptions") or {}
    if not isinstance(descriptions, dict) or not all(isinstance(v, str) and v.strip() for v in descriptions.values()):
        raise GeoclipError(f"{path}: descriptions must map class names to non-empty text")
    if stray := set(descriptions) - set(names):
        raise GeoclipError(f"{path}: descriptions of classes not in names: {sorted(stray)}")
    templates = doc.get("templates")
    return names, dict(descriptions), None if templates is None else _check_templates(templates, str(path))


def served_params(names: list[str], descriptions: dict[str, str] | None = None,
                  templates: list[str] | None = None) -> dict[str, list[str]]:
    """The served model's ``classes``/``descriptions``/``templates`` params for a class list (checked here first)."""
    names = check_names(list(names), "classes")
    return {"classes": names, "descriptions": [(descriptions or {}).get(n, "") for n in names],
            "templates": list(templates or [])}


def requested_classes(names: list[str] | None, classes_file: str | None, where: str) -> dict[str, list[str]] | None:
    """The served model's class params for a list of names or a class file (one of them; None: the trained classes)."""
    if names and classes_file:
        raise GeoclipError(f"{where}: a class list and a class file are both set; give one of them")
    if names:
        return served_params(check_names(list(names), where))
    if classes_file:
        return served_params(*read_class_file(classes_file))
    return None


def vocabulary(cfg: ModelConfig, names: list[str], descriptions: dict[str, str] | None = None,
               templates: list[str] | None = None) -> Vocabulary:
    """Prompts for ``names``: each class worded by its description (given, else the trained one, else its name).

    The model's own class names keep their trained wording, so the trained list gives the trained answers.
    """
    names = check_names(list(names), "classes")
    custom = bool(descriptions) or bool(templates)
    if templates:
        templates = _check_templates(list(templates), "templates")
    else:
        templates = list(cfg.templates or DEFAULT_TEMPLATES)
    wording = {**cfg.descriptions, **(descriptions or {})}
    trained = dict(zip(cfg.class_names, cfg.prompts, strict=True))
    prompts = [tuple(trained[name]) if name in trained and not custom
               else tuple(t.format(wording.get(name, name)) for t in templates) for name in names]
    return Vocabulary(tuple(names), tuple(prompts))


def class_embeddings(model: GeoCLIP, vocab: Vocabulary) -> torch.Tensor:
    """Unit class embeddings ``(C, embed_dim)`` of a vocabulary.

    A trained class worded as in training reuses the sentence embeddings stored in the model; other prompts go
    through the frozen sentence encoder (cached on disk by :func:`geoclip.model.text.embed_prompts`).
    """
    stored = {tuple(p): model.prompt_features[i, :len(p)] for i, p in enumerate(model.cfg.prompts)}
    new = [p for prompts in vocab.prompts if prompts not in stored for p in prompts]
    embedded = iter(())
    if new:
        from geoclip.model.text import embed_prompts

        if model.cfg.text_encoder_finetuned:
            raise GeoclipError("model: trained with train.text_finetune, whose fine-tuned sentence encoder is not "
                               "saved; it answers only over its trained classes (retrain with text_finetune: false)")
        embedded = iter(torch.from_numpy(embed_prompts(new)))
    rows = [stored[prompts] if prompts in stored else torch.stack([next(embedded) for _ in prompts])
            for prompts in vocab.prompts]
    param = next(model.parameters())
    with torch.no_grad():
        features = torch.cat(rows).to(param.device, param.dtype)
        return model.embed_classes(features, counts=[len(p) for p in vocab.prompts])


def query_embedding(model: GeoCLIP, text: str, templates: list[str] | None = None) -> torch.Tensor:
    """Unit embedding ``(embed_dim,)`` of a free-text query, worded with the model's templates like a class."""
    if not isinstance(text, str) or not text.strip():
        raise GeoclipError(f"query {text!r}: expected some text, e.g. 'a river crossing farmland'")
    text = " ".join(text.split())
    templates = _check_templates(list(templates), "templates") if templates else list(
        model.cfg.templates or DEFAULT_TEMPLATES)
    return class_embeddings(model, Vocabulary((text,), (tuple(t.format(text) for t in templates),)))[0]
